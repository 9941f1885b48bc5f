#!/usr/bin/env bash
# A throwaway Kubernetes cluster with a real node, on this machine, for the end-to-end tests and for a
# person who wants to try the operator: the control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler) and a node (containerd, runc, CNI bridge, kubelet,
# kube-proxy, CoreDNS, a `standard` StorageClass from local-path-provisioner), all of one pinned
# release built from Go modules (tests/cluster/go/*) and cached outside the checkout.
#
# Nothing leaves the machine. The node and every pod live in a network namespace made here, which has
# no route out; the control plane runs in the machine's own namespace and is reached from the node
# over a veth pair. The only changes to the machine's namespace are that veth (HOST_IP) and a route
# of the node's pod range to it, so the API server can reach pods (pod proxy) and the kubelet; both
# go away with the namespace. Pod and Service addresses therefore exist only inside the node's
# namespace: run clients there (`node`).
#
#   cluster.sh build              install Debian packages, build and cache the binaries (idempotent)
#   cluster.sh up [DIR]           build if needed, start a cluster with its state in DIR (default: a new
#                                 temp dir); prints DIR last. DIR/env exports KUBECONFIG and puts the
#                                 release's kubectl and helm first on PATH.
#   cluster.sh image DIR          build the bitsfarm image from the checkout (the Dockerfile's build
#                                 stage, then an image like its final stage) and load it into DIR's
#                                 node; prints the image reference last (bitsfarm:<crate version>)
#   cluster.sh node DIR CMD...    run CMD in the node's network namespace, resolving names through
#                                 the cluster's DNS (Service names and ClusterIPs work there)
#   cluster.sh down DIR           stop everything `up` started (by PID), unmount, delete DIR
#   cluster.sh run CMD...         up, image, CMD with DIR/env exported, down (also on failure or a
#                                 signal); exits with CMD's status; DIR is kept when CMD failed
#   cluster.sh env                print the cache folder and the pinned versions
#
# Environment: BITSFARM_K8S_CACHE (cache root; default /var/cache/bitsfarm when writable, else
# ~/.cache/bitsfarm), BITSFARM_KEEP_CLUSTER_STATE=1 keeps DIR on `down` (logs), CLUSTER_TIMEOUT
# (seconds for each readiness wait, default 120).
set -euo pipefail

log() { echo "cluster: $*" >&2; }
die() { echo "cluster: ERROR: $*" >&2; exit 1; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
GO_MODULES=(kubernetes etcd coredns helm local-path-provisioner)
WAIT_S=${CLUSTER_TIMEOUT:-120}
NODE_NAME=bitsfarm-node
SERVICE_CIDR=10.96.0.0/16
KUBERNETES_SVC_IP=10.96.0.1
DNS_SVC_IP=10.96.0.10
# Images the node needs before any pod can start; no registry can be reached, so they are built here.
PAUSE_IMAGE=localhost/bitsfarm-test/pause:1
BUSYBOX_IMAGE=localhost/bitsfarm-test/busybox:1

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo -n"; fi

cache_root() {
  if [[ -n "${BITSFARM_K8S_CACHE:-}" ]]; then echo "$BITSFARM_K8S_CACHE"; return; fi
  if mkdir -p /var/cache/bitsfarm 2>/dev/null && [[ -w /var/cache/bitsfarm ]]; then
    echo /var/cache/bitsfarm
  else
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/bitsfarm"
  fi
}
CACHE=$(cache_root)

# ---------------------------------------------------------------------------------------------
# Packages and binaries

APT_UPDATED=0
APT_LOG="${TMPDIR:-/tmp}/bitsfarm-cluster-apt.log"
apt_install() { # installs only the packages not installed yet
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $APT_UPDATED -eq 0 ]]; then
    log "apt-get update"
    $SUDO env DEBIAN_FRONTEND=noninteractive timeout 600 apt-get update -qq </dev/null >>"$APT_LOG" 2>&1 \
      || { tail -20 "$APT_LOG" >&2; die "apt-get update failed (log $APT_LOG)"; }
    APT_UPDATED=1
  fi
  log "apt-get install ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" </dev/null >>"$APT_LOG" 2>&1 \
    || { tail -20 "$APT_LOG" >&2; die "apt-get install ${missing[*]} failed (log $APT_LOG)"; }
}

# The node's runtime and tools, from Debian: containerd (CRI v1) and runc, the CNI plugins (bridge,
# host-local, loopback, portmap), iptables for kube-proxy, conntrack, and busybox-static for the
# image local-path-provisioner's helper pods run.
DEB_PACKAGES=(containerd runc containernetworking-plugins iptables conntrack iproute2 util-linux
  busybox-static openssl curl ca-certificates gcc libc6-dev python3)

# A module's cache key: its pins and sources, so that changing a version builds anew and nothing else does.
module_key() {
  (cd "$HERE/go/$1" && cat go.mod go.sum ./*.go 2>/dev/null; go env GOVERSION) | sha256sum | cut -c1-16
}
module_version() { # the pinned version of a module's main requirement, e.g. v1.35.4
  awk -v m="$2" '$1==m && $2 ~ /^v/ {print $2; exit}' "$HERE/go/$1/go.mod"
}
bin_dir() { echo "$CACHE/bin/$1-$(module_key "$1")"; }

go_env() {
  export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly
}

build_module() { # name: builds the module's commands into its cache folder
  local name=$1 out pkgs=() ld="-s -w" v
  out=$(bin_dir "$name")
  [[ -f $out/.done ]] && return 0
  case $name in
    kubernetes)
      v=$(module_version kubernetes k8s.io/kubernetes)
      local minor pkg c
      minor=${v#v1.}; minor=${minor%%.*}
      for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ld+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
        ld+=" -X $pkg.buildDate=1970-01-01T00:00:00Z"
      done
      for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
        pkgs+=("k8s.io/kubernetes/cmd/$c")
      done ;;
    etcd | coredns) pkgs=(.) ;;
    helm)
      v=$(module_version helm helm.sh/helm/v4)
      ld+=" -X helm.sh/helm/v4/internal/version.version=$v"
      pkgs=(helm.sh/helm/v4/cmd/helm) ;;
    local-path-provisioner) pkgs=(github.com/rancher/local-path-provisioner) ;;
    *) die "unknown Go module $name" ;;
  esac
  local t0=$SECONDS tmp="$out.tmp"
  rm -rf "$tmp"; mkdir -p "$tmp"
  log "go build ${pkgs[*]} (module tests/cluster/go/$name) into $out"
  (cd "$HERE/go/$name" && go_env && timeout 3600 go build -trimpath -ldflags "$ld" -o "$tmp/" "${pkgs[@]}") \
    >"$tmp.log" 2>&1 || { tail -30 "$tmp.log" >&2; die "go build of tests/cluster/go/$name failed (log $tmp.log)"; }
  touch "$tmp/.done"
  rm -rf "$out"; mv "$tmp" "$out"; rm -f "$tmp.log"
  log "built $name in $((SECONDS - t0)) s"
}

build() {
  apt_install "${DEB_PACKAGES[@]}"
  command -v go >/dev/null || die "no go command: the cluster is built from Go modules with Go 1.26 or later"
  local gv; gv=$(go env GOVERSION)
  [[ $gv =~ ^go1\.([0-9]+) ]] && ((BASH_REMATCH[1] >= 26)) \
    || die "$gv is too old: tests/cluster/go/* need Go 1.26 or later (go.mod says so; GOTOOLCHAIN=local)"
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.build-lock"
  flock -w 3600 9 || die "waited an hour for another build (lock $CACHE/.build-lock)"
  local m t0=$SECONDS
  for m in "${GO_MODULES[@]}"; do build_module "$m"; done
  exec 9>&- # the daemons `up` starts must not inherit the lock
  if ((SECONDS - t0 > 2)); then log "build took $((SECONDS - t0)) s"; fi
}

BIN_K8S="" BIN_ETCD="" BIN_COREDNS="" BIN_HELM="" BIN_LPP=""
resolve_bins() {
  BIN_K8S=$(bin_dir kubernetes); BIN_ETCD=$(bin_dir etcd); BIN_COREDNS=$(bin_dir coredns)
  BIN_HELM=$(bin_dir helm); BIN_LPP=$(bin_dir local-path-provisioner)
}

# The pause and busybox images, built once per version of their sources.
infra_images() {
  local key dir
  key=$( (cat "$HERE/image.py" "$HERE/pause.c"; dpkg-query -W -f='${Version}' busybox-static) | sha256sum | cut -c1-16)
  dir="$CACHE/images/infra-$key"
  if [[ ! -f $dir/.done ]]; then
    rm -rf "$dir"; mkdir -p "$dir"
    python3 "$HERE/image.py" pause --tag "$PAUSE_IMAGE" --out "$dir/pause.tar" >/dev/null \
      || die "building the pause image failed"
    python3 "$HERE/image.py" busybox --tag "$BUSYBOX_IMAGE" --out "$dir/busybox.tar" >/dev/null \
      || die "building the busybox image failed"
    touch "$dir/.done"
  fi
  echo "$dir"
}

# ---------------------------------------------------------------------------------------------
# Start and stop

# start NAME CMD... : runs CMD detached in its own session, logs to $STATE/logs/NAME.log, records its PID
start() {
  local name=$1; shift
  setsid "$@" </dev/null >"$STATE/logs/$name.log" 2>&1 &
  echo "$name $!" >>"$STATE/pids"
}
# in the node's network namespace only (`ip netns exec` would mount a fresh /sys and hide the cgroups)
in_node() { nsenter --net="/run/netns/$NETNS" -- "$@"; }
start_in_node() { local name=$1; shift; start "$name" nsenter --net="/run/netns/$NETNS" -- "$@"; }

pid_of() { awk -v n="$1" '$1==n{print $2}' "$STATE/pids"; }
alive_or_die() {
  local pid; pid=$(pid_of "$1")
  if [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; then
    echo "--- last lines of $STATE/logs/$1.log ---" >&2; tail -30 "$STATE/logs/$1.log" >&2 || true
    die "$1 exited during start-up (log $STATE/logs/$1.log)"
  fi
}
# wait_for WHAT PROCESS CMD... : runs CMD every 0.5 s until it succeeds, for at most WAIT_S seconds,
# failing at once if PROCESS (a name in pids) exits
wait_for() {
  local what=$1 proc=$2 i; shift 2
  for ((i = 0; i < WAIT_S * 2; i++)); do
    [[ -n $proc ]] && alive_or_die "$proc"
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  [[ -n $proc ]] && { echo "--- last lines of $STATE/logs/$proc.log ---" >&2; tail -30 "$STATE/logs/$proc.log" >&2 || true; }
  die "$what: not within ${WAIT_S}s"
}

preflight() {
  [[ $(id -u) -eq 0 ]] || die "the node needs root (network namespaces, cgroups, mounts)"
  local c
  for c in cpu cpuacct cpuset memory pids devices freezer; do
    [[ -d /sys/fs/cgroup/$c ]] || [[ -f /sys/fs/cgroup/cgroup.controllers ]] \
      || die "no cgroup hierarchy for '$c' under /sys/fs/cgroup: the kubelet cannot run pods here"
  done
  grep -qw overlay /proc/filesystems || die "the kernel has no overlayfs: containerd cannot unpack images"
  ip link add bfprobe0 type veth peer name bfprobe1 2>/dev/null \
    || die "the kernel cannot make veth pairs: the node's network cannot be built"
  ip link del bfprobe0
  [[ -d /proc/sys/net/bridge ]] || modprobe br_netfilter 2>/dev/null || true
  for c in containerd runc ctr iptables-restore conntrack nsenter unshare; do
    command -v "$c" >/dev/null || die "$c is missing (cluster.sh build installs it)"
  done
  [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/portmap && -x /usr/lib/cni/loopback ]] \
    || die "CNI plugins missing in /usr/lib/cni (containernetworking-plugins)"
}

# The node's slot: a network namespace bitsfarm-N, its veth and its pod range. `ip netns add` fails
# when the name is taken, so two clusters never share a slot.
claim_slot() {
  local n
  for n in $(seq 1 60); do
    if ip netns add "bitsfarm-$n" 2>/dev/null; then echo "$n"; return 0; fi
  done
  die "all 60 node slots (network namespaces bitsfarm-1..60) are taken: 'cluster.sh down' old clusters"
}

pki() {
  local d="$STATE/pki"; mkdir -p "$d"
  (
    cd "$d"
    key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null; }
    cert() { # name subject [san]
      key "$1"
      openssl req -new -key "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
      if [[ -n ${3:-} ]]; then printf 'subjectAltName=%s\n' "$3" >"$1.ext"; else : >"$1.ext"; fi
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 7 \
        -extfile "$1.ext" 2>/dev/null
    }
    key ca
    openssl req -x509 -new -key ca.key -out ca.crt -days 7 -subj "/CN=bitsfarm-test-ca" 2>/dev/null
    cert apiserver "/CN=kube-apiserver" \
      "IP:$HOST_IP,IP:$KUBERNETES_SVC_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    cert apiserver-kubelet-client "/CN=kube-apiserver-kubelet-client/O=system:masters"
    cert kubelet "/CN=$NODE_NAME" "IP:$NODE_IP,DNS:$NODE_NAME"
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
    openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
    rm -f ./*.csr ./*.ext
  ) || die "openssl failed to make the cluster's certificates"
}

# kubeconfig NAME TOKEN : a kubeconfig for one identity of tokens.csv
kubeconfig() {
  cat >"$STATE/kubeconfigs/$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: bitsfarm-test
  cluster:
    server: https://$HOST_IP:6443
    certificate-authority-data: $(base64 -w0 <"$STATE/pki/ca.crt")
users:
- name: $1
  user:
    token: $2
contexts:
- name: bitsfarm-test
  context: {cluster: bitsfarm-test, user: $1, namespace: default}
current-context: bitsfarm-test
KC
}

tokens() {
  mkdir -p "$STATE/kubeconfigs"
  local who user groups t
  : >"$STATE/pki/tokens.csv"
  # identity  user  groups: the control plane's own users have their bootstrap RBAC roles
  while read -r who user groups; do
    t=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    echo "$t,$user,$who,\"$groups\"" >>"$STATE/pki/tokens.csv"
    kubeconfig "$who" "$t"
  done <<'IDS'
admin admin system:masters
kubelet system:node:bitsfarm-node system:nodes
kube-proxy system:kube-proxy system:authenticated
kube-controller-manager system:kube-controller-manager system:authenticated
kube-scheduler system:kube-scheduler system:authenticated
IDS
  cp "$STATE/kubeconfigs/admin" "$STATE/kubeconfig"
}

network() {
  local host_if="bfh$SLOT"
  ip link add "$host_if" type veth peer name "bfn$SLOT" || die "ip link add veth failed"
  ip link set "bfn$SLOT" netns "$NETNS"
  ip addr add "$HOST_IP/24" dev "$host_if"
  ip link set "$host_if" up
  in_node ip link set lo up
  in_node ip link set "bfn$SLOT" name eth0
  in_node ip addr add "$NODE_IP/24" dev eth0
  in_node ip link set eth0 up
  # The bridge the CNI plugin fills, made now so that Service addresses have a route before the first
  # pod: without one, connect() fails with "network is unreachable" before kube-proxy's DNAT is seen.
  in_node ip link add cni0 type bridge
  in_node ip addr add "$POD_GW/24" dev cni0
  in_node ip link set cni0 up
  in_node ip route add "$SERVICE_CIDR" dev cni0
  # Replies to pods and the API server's pod proxy: the pod range is reached through the node.
  ip route add "$POD_CIDR" via "$NODE_IP" dev "$host_if"
  in_node sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.route_localnet=1 \
    net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1 \
    || die "cannot set the node namespace's sysctls (is br_netfilter available?)"
}

control_plane() {
  local etcd_c etcd_p
  etcd_c=$(free_port); etcd_p=$(free_port)
  start etcd "$BIN_ETCD/etcd" --name node --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_c" --advertise-client-urls "http://127.0.0.1:$etcd_c" \
    --listen-peer-urls "http://127.0.0.1:$etcd_p" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_p" \
    --initial-cluster "node=http://127.0.0.1:$etcd_p" --listen-metrics-urls "" --log-level warn \
    --unsafe-no-fsync
  wait_for "etcd healthy" etcd sh -c "curl -fsS -m 2 http://127.0.0.1:$etcd_c/health | grep -q '\"health\":\"true\"'"

  # An audit log of every write, which the e2e tests read to count writes.
  cat >"$STATE/audit-policy.yaml" <<'POLICY'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Request
  verbs: ["create", "update", "patch"]
  resources:
  - {group: "apps", resources: ["statefulsets"]}
  - {group: "", resources: ["services", "configmaps"]}
  - {group: "bitsfarm.io", resources: ["uploadfarms", "uploadfarms/status"]}
- level: Metadata
  verbs: ["create", "update", "patch", "delete", "deletecollection"]
- level: None
POLICY
  local pki="$STATE/pki"
  start kube-apiserver "$BIN_K8S/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$etcd_c" --bind-address="$HOST_IP" --advertise-address="$HOST_IP" \
    --secure-port=6443 --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" --token-auth-file="$pki/tokens.csv" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$pki/ca.crt" --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --api-audiences=https://kubernetes.default.svc.cluster.local --service-cluster-ip-range="$SERVICE_CIDR" \
    --allow-privileged=false --cert-dir="$STATE/apiserver-certs" \
    --audit-policy-file="$STATE/audit-policy.yaml" --audit-log-path="$STATE/audit.log" \
    --audit-log-format=json --audit-log-mode=blocking
  wait_for "kube-apiserver ready" kube-apiserver \
    "$BIN_K8S/kubectl" --kubeconfig "$STATE/kubeconfig" --request-timeout=2s get --raw /readyz

  start kube-controller-manager "$BIN_K8S/kube-controller-manager" \
    --kubeconfig="$STATE/kubeconfigs/kube-controller-manager" \
    --bind-address=127.0.0.1 --secure-port=0 --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
    --allocate-node-cidrs=false
  start kube-scheduler "$BIN_K8S/kube-scheduler" --kubeconfig="$STATE/kubeconfigs/kube-scheduler" \
    --bind-address=127.0.0.1 --secure-port=0 --leader-elect=false
}

containerd_up() {
  local d="$STATE/containerd"
  mkdir -p "$d" "$STATE/cni/net.d"
  cat >"$STATE/cni/net.d/10-bitsfarm.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "bitsfarm",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$STATE/cni/ipam",
              "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GW"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
  cat >"$d/config.toml" <<TOML
version = 2
root = "$d/root"
state = "$d/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$d/containerd.sock"
[ttrpc]
  address = "$d/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$d/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # Root here lacks CAP_SYS_RESOURCE: a negative oom_score_adj fails every sandbox.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$d/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
TOML
  start_in_node containerd containerd --config "$d/config.toml"
  wait_for "containerd answering" containerd ctr --address "$d/containerd.sock" version
  local infra; infra=$(infra_images)
  ctr_import "$infra/pause.tar"
  ctr_import "$infra/busybox.tar"
}

ctr_import() {
  ctr --address "$STATE/containerd/containerd.sock" -n k8s.io images import --no-unpack=false "$1" \
    >>"$STATE/logs/images.log" 2>&1 || { tail -5 "$STATE/logs/images.log" >&2; die "ctr images import $1 failed"; }
}

# The kubelet sets these kernel tunables as on every node; what they were is put back on `down`.
KUBELET_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
save_sysctls() {
  local s
  for s in "${KUBELET_SYSCTLS[@]}"; do echo "$s=$(sysctl -n "$s")"; done >"$STATE/sysctl.saved"
}

cgroup_dirs() { # the node's cgroup root in every hierarchy
  local h
  for h in /sys/fs/cgroup/*/; do
    [[ -f $h/cgroup.procs ]] && echo "${h%/}/$CGROUP_ROOT"
  done
}

kubelet_up() {
  local c
  # The kubelet's pods go under a cgroup root of this cluster's own, made in every hierarchy.
  for c in $(cgroup_dirs); do
    mkdir -p "$c"
    if [[ $c == */cpuset/* ]]; then
      cat "$(dirname "$c")/cpuset.cpus" >"$c/cpuset.cpus"
      cat "$(dirname "$c")/cpuset.mems" >"$c/cpuset.mems"
    fi
  done
  save_sysctls
  printf 'nameserver %s\n' "$DNS_SVC_IP" >"$STATE/kubelet-resolv.conf"
  mkdir -p "$STATE/kubelet"
  cat >"$STATE/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $STATE/pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $STATE/pki/kubelet.crt
tlsPrivateKeyFile: $STATE/pki/kubelet.key
containerRuntimeEndpoint: unix://$STATE/containerd/containerd.sock
# This machine's cgroups are v1 (a v2 hierarchy beside them): cgroupfs driver, and kubelets from
# 1.35 on refuse v1 unless told not to.
cgroupDriver: cgroupfs
failCgroupV1: false
cgroupRoot: /$CGROUP_ROOT
cgroupsPerQOS: true
enforceNodeAllocatable: ["pods"]
failSwapOn: false
# Root here cannot lower an oom_score_adj (no CAP_SYS_RESOURCE).
oomScoreAdj: 0
clusterDNS: ["$DNS_SVC_IP"]
clusterDomain: cluster.local
resolvConf: $STATE/kubelet-resolv.conf
# No registry can be reached: an image garbage-collected could never come back.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
serializeImagePulls: false
syncFrequency: 10s
podLogsDir: $STATE/pod-logs
YAML
  start_in_node kubelet "$BIN_K8S/kubelet" --config="$STATE/kubelet.yaml" \
    --kubeconfig="$STATE/kubeconfigs/kubelet" --root-dir="$STATE/kubelet" --cert-dir="$STATE/kubelet/pki" \
    --node-ip="$NODE_IP" --hostname-override="$NODE_NAME"
  wait_for "node $NODE_NAME Ready" kubelet sh -c \
    "'$BIN_K8S/kubectl' --kubeconfig '$STATE/kubeconfig' get node '$NODE_NAME' -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
}

kube_proxy_up() {
  cat >"$STATE/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: $STATE/kubeconfigs/kube-proxy}
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# conntrack's limits are the machine's, not the namespace's: leave them as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
  start_in_node kube-proxy "$BIN_K8S/kube-proxy" --config="$STATE/kube-proxy.yaml"
  wait_for "kube-proxy healthy" kube-proxy in_node curl -fsS -m 2 http://127.0.0.1:10256/healthz
}

kubectl_admin() { "$BIN_K8S/kubectl" --kubeconfig "$STATE/kubeconfig" --request-timeout=20s "$@"; }

dns_up() {
  # CoreDNS runs on the node, outside any pod, as kube-proxy does; the kube-dns Service points at it.
  cat >"$STATE/Corefile" <<COREFILE
.:53 {
    errors
    ready 127.0.0.1:8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $STATE/kubeconfig
        pods insecure
        ttl 5
    }
    cache 5
    loop
    loadbalance
}
COREFILE
  start_in_node coredns "$BIN_COREDNS/coredns" -conf "$STATE/Corefile"
  wait_for "CoreDNS ready" coredns in_node curl -fsS -m 2 http://127.0.0.1:8181/ready
  kubectl_admin apply --server-side --field-manager=cluster.sh -f - >/dev/null <<YAML || die "cannot create the kube-dns Service"
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns}
spec:
  clusterIP: $DNS_SVC_IP
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-node
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: cluster.sh}
addressType: IPv4
endpoints:
- addresses: ["$NODE_IP"]
  conditions: {ready: true}
  nodeName: $NODE_NAME
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
YAML
  cat >"$STATE/node-resolv.conf" <<RESOLV
search default.svc.cluster.local svc.cluster.local cluster.local
nameserver $DNS_SVC_IP
options ndots:5 timeout:2 attempts:2
RESOLV
  wait_for "kubernetes.default.svc.cluster.local resolving through the kube-dns Service" "" \
    node_exec getent hosts kubernetes.default.svc.cluster.local
}

storage_up() {
  mkdir -p "$STATE/local-path"
  cat >"$STATE/local-path.json" <<JSON
{"nodePathMap": [{"node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": ["$STATE/local-path"]}]}
JSON
  cat >"$STATE/local-path-helper.yaml" <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: helper-pod
spec:
  tolerations:
  - {key: node.kubernetes.io/disk-pressure, operator: Exists, effect: NoSchedule}
  containers:
  - name: helper-pod
    image: $BUSYBOX_IMAGE
    imagePullPolicy: Never
YAML
  kubectl_admin apply --server-side --field-manager=cluster.sh -f - >/dev/null <<YAML || die "cannot create the standard StorageClass"
apiVersion: v1
kind: Namespace
metadata: {name: local-path-storage}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: local-path-provisioner-service-account, namespace: local-path-storage}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: local-path-config, namespace: local-path-storage}
data:
  setup: |-
    #!/bin/sh
    set -eu
    mkdir -m 0777 -p "\$VOL_DIR"
  teardown: |-
    #!/bin/sh
    set -eu
    rm -rf "\$VOL_DIR"
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: standard
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: rancher.io/local-path
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Delete
YAML
  start_in_node local-path-provisioner "$BIN_LPP/local-path-provisioner" start \
    --kubeconfig "$STATE/kubeconfig" --config "$STATE/local-path.json" \
    --helper-pod-file "$STATE/local-path-helper.yaml" --helper-image "$BUSYBOX_IMAGE" \
    --namespace local-path-storage --service-account-name local-path-provisioner-service-account
  sleep 1
  alive_or_die local-path-provisioner
}

free_port() {
  local p i
  for i in $(seq 1 200); do
    p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && ! grep -qx "$p" "$STATE/ports" 2>/dev/null; then
      echo "$p" >>"$STATE/ports"; echo "$p"; return
    fi
  done
  die "no free port found"
}

slot_vars() {
  SLOT=$1
  NETNS="bitsfarm-$SLOT"
  HOST_IP="172.30.$SLOT.1"
  NODE_IP="172.30.$SLOT.2"
  POD_CIDR="10.244.$SLOT.0/24"
  POD_GW="10.244.$SLOT.1"
  CGROUP_ROOT="bitsfarm-$SLOT"
}

up() {
  build
  resolve_bins
  preflight
  STATE=${1:-}
  if [[ -z $STATE ]]; then STATE=$(mktemp -d "${TMPDIR:-/tmp}/bitsfarm-cluster.XXXXXX"); else mkdir -p "$STATE"; fi
  STATE=$(cd "$STATE" && pwd)
  [[ ! -s $STATE/pids ]] || die "$STATE holds a cluster already ('cluster.sh down $STATE' first)"
  mkdir -p "$STATE/logs"; : >"$STATE/pids"; : >"$STATE/ports"
  trap 'echo "cluster: failed; stopping what was started" >&2; down_dir "$STATE" || true' ERR
  trap 'echo "cluster: interrupted; stopping what was started" >&2; down_dir "$STATE" || true; exit 130' INT TERM
  local t0=$SECONDS
  slot_vars "$(claim_slot)"
  echo "$SLOT" >"$STATE/slot"
  network
  pki
  tokens
  control_plane
  containerd_up
  kubelet_up
  kube_proxy_up
  dns_up
  storage_up
  wait_for "the default ServiceAccount" "kube-controller-manager" kubectl_admin -n default get serviceaccount default
  mkdir -p "$STATE/bin" "$STATE/home"
  ln -sf "$BIN_K8S/kubectl" "$STATE/bin/kubectl"
  ln -sf "$BIN_HELM/helm" "$STATE/bin/helm"
  cat >"$STATE/env" <<ENV
export KUBECONFIG=$STATE/kubeconfig
export PATH=$STATE/bin:\$PATH
export HELM_CACHE_HOME=$STATE/home/helm-cache HELM_CONFIG_HOME=$STATE/home/helm-config HELM_DATA_HOME=$STATE/home/helm-data
export BITSFARM_CLUSTER_DIR=$STATE
export BITSFARM_CLUSTER_SH=$HERE/cluster.sh
export BITSFARM_E2E_KUBECONFIG=$STATE/kubeconfig
export BITSFARM_E2E_KUBECTL=$BIN_K8S/kubectl
export BITSFARM_E2E_HELM=$BIN_HELM/helm
export BITSFARM_E2E_AUDIT_LOG=$STATE/audit.log
export BITSFARM_E2E_STATE=$STATE
ENV
  trap - ERR INT TERM
  log "cluster up in $((SECONDS - t0)) s: API https://$HOST_IP:6443, node $NODE_NAME ($NODE_IP, network namespace $NETNS), state $STATE"
  echo "$STATE"
}

# node_exec CMD... : CMD in the node's network namespace, with a private mount namespace whose
# /etc/resolv.conf asks the cluster's DNS
node_exec() {
  unshare --mount --propagation private -- sh -c \
    'mount --bind "$1" /etc/resolv.conf && shift && exec nsenter --net="/run/netns/$0" -- "$@"' \
    "$NETNS" "$STATE/node-resolv.conf" "$@"
}

load_state() { # DIR
  [[ -f $1/slot ]] || die "$1 is not a cluster's folder (no slot file)"
  STATE=$(cd "$1" && pwd)
  slot_vars "$(cat "$STATE/slot")"
  resolve_bins
}

node_cmd() {
  [[ $# -ge 2 ]] || die "usage: $0 node DIR CMD..."
  load_state "$1"; shift
  node_exec "$@"
}

crate_version() { awk -F'"' '/^version *=/ {print $2; exit}' "$ROOT/Cargo.toml"; }

image() {
  [[ $# -eq 1 ]] || die "usage: $0 image DIR"
  load_state "$1"
  local binary tag out
  tag="bitsfarm:$(crate_version)"
  binary=$(python3 "$HERE/image.py" build-stage --cache "$CACHE/dockerfile-build" | tail -1) \
    || die "the Dockerfile's build stage failed"
  out="$STATE/images"; mkdir -p "$out"
  python3 "$HERE/image.py" bitsfarm --binary "$binary" --tag "$tag" --out "$out/bitsfarm.tar" >/dev/null \
    || die "building the bitsfarm image failed"
  ctr_import "$out/bitsfarm.tar"
  log "image $tag loaded into the node"
  echo "$tag"
}

# Everything `up` started, stopped by PID, newest first; then the pods' processes, the container
# shims, the mounts under DIR, the namespace, the cgroups and the kernel tunables.
down_dir() {
  # Best effort to the end: one step that fails (a cgroup gone while it is walked) must not leave
  # the rest running or mounted.
  set +e +o pipefail
  local dir=$1 name pid i
  [[ -f $dir/pids ]] || { log "nothing to stop in $dir"; return 0; }
  local slot=""; [[ -f $dir/slot ]] && slot=$(cat "$dir/slot")
  stop_pid() {
    local name=$1 pid=$2
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then log "$name ($pid) ignored TERM; KILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  }
  # The kubelet first, so that it restarts nothing.
  pid=$(awk '$1=="kubelet"{print $2}' "$dir/pids"); [[ -n $pid ]] && stop_pid kubelet "$pid"
  if [[ -n $slot ]]; then
    local cg round procs
    for ((round = 0; round < 50; round++)); do
      procs=$(find /sys/fs/cgroup/*/"bitsfarm-$slot" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)
      [[ -z $procs ]] && break
      # shellcheck disable=SC2086
      kill -KILL $procs 2>/dev/null || true
      sleep 0.1
    done
  fi
  # The shims of this cluster's containerd (they outlive it on purpose).
  pkill -KILL -f "containerd-shim-runc-v2 .*-address $dir/containerd/containerd.sock" 2>/dev/null || true
  # The rest at once, newest first; then a bounded wait for all of them.
  tac "$dir/pids" | while read -r name pid; do kill -TERM "$pid" 2>/dev/null; done
  tac "$dir/pids" | while read -r name pid; do stop_pid "$name" "$pid"; done
  pkill -KILL -f "containerd-shim-runc-v2 .*-address $dir/containerd/containerd.sock" 2>/dev/null || true
  # Unmount deepest first, lazily, so that nothing below DIR stays mounted when it is deleted.
  awk -v d="$dir/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  if [[ -n $slot ]]; then
    ip netns del "bitsfarm-$slot" 2>/dev/null || true
    ip link del "bfh$slot" 2>/dev/null || true
    for cg in $(find /sys/fs/cgroup/*/"bitsfarm-$slot" -depth -type d 2>/dev/null); do rmdir "$cg" 2>/dev/null || true; done
  fi
  if [[ -f $dir/sysctl.saved ]] && ! ls /run/netns/bitsfarm-* >/dev/null 2>&1; then
    sysctl -q -p "$dir/sysctl.saved" >/dev/null 2>&1 || true
  fi
  if [[ "${BITSFARM_KEEP_CLUSTER_STATE:-0}" == 1 ]]; then
    : >"$dir/pids"; log "kept $dir"
  else
    rm -rf --one-file-system "$dir"
  fi
  log "down: $dir"
}

run() {
  [[ $# -gt 0 ]] || die "usage: $0 run CMD..."
  local dir rc=0
  dir=$(up)
  # shellcheck disable=SC2064 # expand $dir now
  trap "down_dir '$dir'" EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  image "$dir" >/dev/null
  # shellcheck disable=SC1091
  . "$dir/env"
  export BITSFARM_E2E_IMAGE
  BITSFARM_E2E_IMAGE="bitsfarm:$(crate_version)"
  # In the background, so that a signal to this script is handled now and not when CMD ends.
  "$@" <&0 &
  local child=$!
  # shellcheck disable=SC2064 # expand $child now
  trap "kill -TERM $child 2>/dev/null; wait $child; exit 143" TERM
  # shellcheck disable=SC2064
  trap "kill -INT $child 2>/dev/null; wait $child; exit 130" INT
  wait "$child" || rc=$?
  if [[ $rc -ne 0 ]]; then
    export BITSFARM_KEEP_CLUSTER_STATE=1
    log "command failed ($rc); cluster logs kept in $dir/logs"
  fi
  return $rc
}

env_cmd() {
  resolve_bins
  echo "cache: $CACHE"
  echo "kubernetes $(module_version kubernetes k8s.io/kubernetes): $BIN_K8S"
  echo "etcd $(module_version etcd go.etcd.io/etcd/server/v3): $BIN_ETCD"
  echo "coredns $(module_version coredns github.com/coredns/coredns): $BIN_COREDNS"
  echo "helm $(module_version helm helm.sh/helm/v4): $BIN_HELM"
  echo "local-path-provisioner $(module_version local-path-provisioner github.com/rancher/local-path-provisioner): $BIN_LPP"
}

cmd=${1:-}
shift || true
case "$cmd" in
  build) build ;;
  up) up "$@" ;;
  image) image "$@" ;;
  node) node_cmd "$@" ;;
  run) run "$@" ;;
  down) [[ -n "${1:-}" ]] || die "usage: $0 down DIR"; down_dir "$1" ;;
  env) env_cmd ;;
  *) echo "usage: $0 build | up [DIR] | image DIR | node DIR CMD... | down DIR | run CMD... | env" >&2; exit 2 ;;
esac
