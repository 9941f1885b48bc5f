#!/usr/bin/env bash
# A throwaway Kubernetes 1.20 control plane on 127.0.0.1 for the end-to-end tests
# (tests/cluster_e2e.rs): etcd from Debian, kube-apiserver and kube-controller-manager built from
# Debian's `kubernetes` source package (v1.20.2) once and cached outside the checkout.
# See shared docs/real-apiserver.md for where each step comes from.
#
#   tests/cluster/cluster.sh build          install packages, build and cache the binaries (idempotent)
#   tests/cluster/cluster.sh up [DIR]       build if needed, start the cluster; state in DIR (default: a
#                                           new temp dir); prints DIR; DIR/kubeconfig, DIR/env
#   tests/cluster/cluster.sh down DIR       stop what `up` started (by PID) and delete DIR
#   tests/cluster/cluster.sh run CMD...     up, run CMD with DIR/env exported, down (also on failure
#                                           or a signal); exits with CMD's status; DIR is kept when
#                                           CMD failed, for its logs
#   tests/cluster/cluster.sh env            print the cache folder and the versions in use
#
# Environment: BITSFARM_K8S_CACHE (cache root; default /var/cache/bitsfarm when writable, else
# ~/.cache/bitsfarm), BITSFARM_KEEP_CLUSTER_STATE=1 keeps DIR on `down` (logs), CLUSTER_TIMEOUT
# (seconds for each readiness wait, default 60).
set -euo pipefail

log() { echo "cluster: $*" >&2; }
die() { echo "cluster: ERROR: $*" >&2; exit 1; }

WAIT_S=${CLUSTER_TIMEOUT:-60}

cache_root() {
  if [[ -n "${BITSFARM_K8S_CACHE:-}" ]]; then echo "$BITSFARM_K8S_CACHE"; return; fi
  if mkdir -p /var/cache/bitsfarm 2>/dev/null && [[ -w /var/cache/bitsfarm ]]; then
    echo /var/cache/bitsfarm
  else
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/bitsfarm"
  fi
}

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo -n"; fi
APT_UPDATED=0
APT_LOG="${TMPDIR:-/tmp}/bitsfarm-cluster-apt.log"
apt_update_once() {
  if [[ $APT_UPDATED -eq 0 ]]; then
    log "apt-get update"
    $SUDO env DEBIAN_FRONTEND=noninteractive timeout 600 apt-get update -qq </dev/null >>"$APT_LOG" 2>&1 \
      || { tail -20 "$APT_LOG" >&2; die "apt-get update failed (log $APT_LOG)"; }
    APT_UPDATED=1
  fi
}

# Add a deb-src entry for the same mirror as the existing Debian `deb` entry (once).
ensure_deb_src() {
  local f=/etc/apt/sources.list.d/bitsfarm-deb-src.sources
  [[ -f $f ]] && return 0
  local uri="http://deb.debian.org/debian" key="/usr/share/keyrings/debian-archive-keyring.gpg"
  local src=/etc/apt/sources.list.d/debian.sources
  if [[ -f $src ]]; then
    # first stanza's URIs and Signed-By
    uri=$(awk '/^URIs:/{print $2; exit}' "$src")
    key=$(awk '/^Signed-By:/{print $2; exit}' "$src")
  fi
  log "adding deb-src entry $f ($uri)"
  printf 'Types: deb-src\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: %s\n' \
    "$uri" "$key" | $SUDO tee "$f" >/dev/null
  APT_UPDATED=0
}

apt_install() { # installs only the packages not installed yet
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  apt_update_once
  log "apt-get install ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" </dev/null >>"$APT_LOG" 2>&1 \
    || { tail -20 "$APT_LOG" >&2; die "apt-get install ${missing[*]} failed (log $APT_LOG)"; }
}

# Version of Debian's kubernetes source package, e.g. 1.20.5+really1.20.2-1.1
k8s_src_version() {
  local v
  v=$(apt-cache showsrc kubernetes 2>/dev/null | awk '/^Version:/{print $2}' | sort -V | tail -1 || true)
  if [[ -z "$v" ]]; then
    ensure_deb_src
    apt_update_once
    v=$(apt-cache showsrc kubernetes 2>/dev/null | awk '/^Version:/{print $2}' | sort -V | tail -1 || true)
  fi
  [[ -n "$v" ]] || die "apt-cache showsrc kubernetes found no source package (is the deb-src entry there?)"
  echo "$v"
}

BIN_DIR=""
KUBECTL=""
resolve_bins() {
  local ver root
  root=$(cache_root)
  if [[ -n "${BITSFARM_K8S_VERSION:-}" ]]; then ver=$BITSFARM_K8S_VERSION; else
    ver=$(k8s_src_version) # from the local apt lists: no network on a warm run
  fi
  BIN_DIR="$root/k8s-$ver"
}

# No kubectl on the machine: take the one of Debian's kubernetes-client package (built from the
# same source, v1.20.2) out of its .deb into the cache, without installing the package.
get_kubectl() {
  apt_install dpkg-dev
  local tmp
  tmp=$(mktemp -d)
  log "no kubectl on PATH: extracting it from Debian's kubernetes-client package into $BIN_DIR"
  if ! (cd "$tmp" && timeout 600 apt-get download kubernetes-client >"$tmp/log" 2>&1); then
    apt_update_once
    (cd "$tmp" && timeout 600 apt-get download kubernetes-client >"$tmp/log" 2>&1) \
      || { tail -20 "$tmp/log" >&2; rm -rf "$tmp"; die "apt-get download kubernetes-client failed"; }
  fi
  dpkg-deb -x "$tmp"/kubernetes-client_*.deb "$tmp/x" || { rm -rf "$tmp"; die "dpkg-deb -x kubernetes-client failed"; }
  mkdir -p "$BIN_DIR"
  install -m 0755 "$tmp/x/usr/bin/kubectl" "$BIN_DIR/kubectl" || { rm -rf "$tmp"; die "no usr/bin/kubectl in kubernetes-client"; }
  rm -rf "$tmp"
}

build() {
  apt_install etcd-server etcd-client openssl ca-certificates curl
  resolve_bins
  if ! command -v kubectl >/dev/null 2>&1 && [[ ! -x $BIN_DIR/kubectl ]]; then get_kubectl; fi
  local need=()
  [[ -x $BIN_DIR/kube-apiserver ]] || need+=(kube-apiserver)
  [[ -x $BIN_DIR/kube-controller-manager ]] || need+=(kube-controller-manager)
  if [[ ${#need[@]} -eq 0 ]]; then log "cached binaries in $BIN_DIR"; return 0; fi

  mkdir -p "$(dirname "$BIN_DIR")"
  exec 9>"$(dirname "$BIN_DIR")/.build-lock"
  flock -w 1800 9 || die "waited 30 min for another build (lock $(dirname "$BIN_DIR")/.build-lock)"
  # another process may have built it while we waited
  local n=() t
  for t in "${need[@]}"; do [[ -x $BIN_DIR/$t ]] || n+=("$t"); done
  if [[ ${#n[@]} -eq 0 ]]; then exec 9>&-; log "cached binaries in $BIN_DIR"; return 0; fi
  need=("${n[@]}")

  local t0=$SECONDS
  log "building ${need[*]} from Debian's kubernetes source package into $BIN_DIR (first run: about 5 min on 2 cores)"
  ensure_deb_src
  apt_install golang-go rsync dpkg-dev make golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
  local work="$BIN_DIR.build"
  rm -rf "$work"; mkdir -p "$work"
  ( cd "$work" && timeout 600 apt-get source --download-only kubernetes >"$work/source.log" 2>&1 ) \
    || { tail -20 "$work/source.log" >&2; die "apt-get source kubernetes failed"; }
  ( cd "$work" && dpkg-source -x kubernetes_*.dsc src >>"$work/source.log" 2>&1 ) \
    || { tail -20 "$work/source.log" >&2; die "dpkg-source -x failed"; }
  local tree="$work/src"
  [[ -d $tree/cmd/kube-apiserver ]] || die "unexpected source layout in $tree"

  # Go >= 1.18 crashes reflect2 1.0.1 / json-iterator 1.1.10: use Debian's newer copies.
  local pair vend sys
  for pair in "github.com/modern-go/reflect2" "github.com/json-iterator/go"; do
    vend="$tree/vendor/$pair"; sys="/usr/share/gocode/src/$pair"
    [[ -d $vend && -d $sys ]] || die "missing $vend or $sys"
    find "$vend" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' -delete
    find "$sys" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' -exec cp {} "$vend/" \;
  done

  export GOPATH="$work/gopath" GOCACHE="$work/gocache" GO111MODULE=off CGO_ENABLED=0 GOPROXY=off GOFLAGS=
  mkdir -p "$GOPATH/src/k8s.io"
  ln -sfn "$tree" "$GOPATH/src/k8s.io/kubernetes"
  log "make generated_files"
  ( cd "$GOPATH/src/k8s.io/kubernetes" && rm -rf _output/bin && timeout 1200 make generated_files >"$work/generated.log" 2>&1 ) \
    || { tail -30 "$work/generated.log" >&2; die "make generated_files failed (log: $work/generated.log)"; }
  local ld="-s -w" pkg
  for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=v1.20.2 -X $pkg.gitMajor=1 -X $pkg.gitMinor=20 -X $pkg.gitTreeState=clean"
    ld+=" -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  mkdir -p "$BIN_DIR"
  for t in "${need[@]}"; do
    log "go build ./cmd/$t"
    ( cd "$GOPATH/src/k8s.io/kubernetes" && timeout 2400 go build -ldflags "$ld" -o "$work/out/$t" "./cmd/$t" >"$work/build-$t.log" 2>&1 ) \
      || { tail -30 "$work/build-$t.log" >&2; die "go build $t failed (log: $work/build-$t.log)"; }
    mv "$work/out/$t" "$BIN_DIR/$t"
  done
  rm -rf "$work"
  exec 9>&- # the lock; the daemons `up` starts must not inherit it
  log "built ${need[*]} in $((SECONDS - t0)) s"
}

free_port() {
  local p i
  for i in $(seq 1 200); do
    p=$(( 20000 + (RANDOM * 32768 + RANDOM) % 40000 ))
    if ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then
      if ! grep -qw "$p" "${USED_PORTS:-/dev/null}" 2>/dev/null; then echo "$p"; return; fi
    fi
  done
  die "no free port found"
}

# start NAME LOG CMD... : runs CMD detached (own session), records its PID in $STATE/pids
start() {
  local name=$1 logf=$2; shift 2
  setsid "$@" </dev/null >"$logf" 2>&1 &
  local pid=$!
  echo "$name $pid" >>"$STATE/pids"
  log "started $name (pid $pid, log $logf)"
}

alive_or_die() { # name
  local name=$1 pid
  pid=$(awk -v n="$name" '$1==n{print $2}' "$STATE/pids")
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "--- last lines of $STATE/$name.log ---" >&2; tail -25 "$STATE/$name.log" >&2 || true
    down_dir "$STATE"; die "$name exited during start-up"
  fi
}

up() {
  build
  if command -v kubectl >/dev/null 2>&1; then KUBECTL=$(command -v kubectl); else KUBECTL=$BIN_DIR/kubectl; fi
  STATE=${1:-}
  if [[ -z "$STATE" ]]; then STATE=$(mktemp -d "${TMPDIR:-/tmp}/bitsfarm-cluster.XXXXXX"); else mkdir -p "$STATE"; fi
  STATE=$(cd "$STATE" && pwd)
  : >"$STATE/pids"; USED_PORTS="$STATE/ports"; : >"$USED_PORTS"
  trap 'echo "cluster: failed; stopping what was started" >&2; down_dir "$STATE" || true' ERR
  local t0=$SECONDS
  local pki="$STATE/pki"; mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj "/CN=bitsfarm-test-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n' >san.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 2 -extfile san.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  ) || die "openssl failed to make the test PKI"
  local token; token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  echo "$token,admin,admin,system:masters" >"$pki/tokens.csv"

  local etcd_c etcd_p api
  etcd_c=$(free_port); echo "$etcd_c" >>"$USED_PORTS"
  etcd_p=$(free_port); echo "$etcd_p" >>"$USED_PORTS"
  api=$(free_port); echo "$api" >>"$USED_PORTS"

  start etcd "$STATE/etcd.log" etcd --name t --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_c" --advertise-client-urls "http://127.0.0.1:$etcd_c" \
    --listen-peer-urls "http://127.0.0.1:$etcd_p" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_p" \
    --initial-cluster "t=http://127.0.0.1:$etcd_p" --listen-metrics-urls "" --log-level warn
  local i ok=0
  for ((i = 0; i < WAIT_S * 5; i++)); do
    alive_or_die etcd
    if curl -fsS -m 2 "http://127.0.0.1:$etcd_c/health" 2>/dev/null | grep -q '"health":"true"'; then ok=1; break; fi
    sleep 0.2
  done
  [[ $ok -eq 1 ]] || { down_dir "$STATE"; die "etcd not healthy after ${WAIT_S}s (log $STATE/etcd.log)"; }

  # audit log of every write (used by the e2e tests to count writes)
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
  start kube-apiserver "$STATE/kube-apiserver.log" "$BIN_DIR/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$etcd_c" --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
    --secure-port="$api" --insecure-port=0 \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" --token-auth-file="$pki/tokens.csv" --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --api-audiences=https://kubernetes.default.svc.cluster.local --service-cluster-ip-range=10.96.0.0/24 \
    --allow-privileged=true --endpoint-reconciler-type=none --cert-dir="$STATE/apiserver-certs" \
    --audit-policy-file="$STATE/audit-policy.yaml" --audit-log-path="$STATE/audit.log" \
    --audit-log-format=json --audit-log-mode=blocking

  cat >"$STATE/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: bitsfarm-test
  cluster:
    server: https://127.0.0.1:$api
    certificate-authority-data: $(base64 -w0 <"$pki/ca.crt")
users:
- name: admin
  user:
    token: $token
contexts:
- name: bitsfarm-test
  context: {cluster: bitsfarm-test, user: admin, namespace: default}
current-context: bitsfarm-test
KC
  ok=0
  for ((i = 0; i < WAIT_S * 2; i++)); do
    alive_or_die kube-apiserver
    if "$KUBECTL" --kubeconfig "$STATE/kubeconfig" --request-timeout=2s get --raw /readyz >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.5
  done
  [[ $ok -eq 1 ]] || { tail -25 "$STATE/kube-apiserver.log" >&2; down_dir "$STATE"; die "kube-apiserver not ready after ${WAIT_S}s (log $STATE/kube-apiserver.log)"; }

  start kube-controller-manager "$STATE/kube-controller-manager.log" "$BIN_DIR/kube-controller-manager" \
    --kubeconfig="$STATE/kubeconfig" --bind-address=127.0.0.1 --port=0 --secure-port=0 --leader-elect=false \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --use-service-account-credentials=false
  # Pods are refused until the controller-manager made the `default` ServiceAccount.
  ok=0
  for ((i = 0; i < WAIT_S * 2; i++)); do
    alive_or_die kube-controller-manager
    if "$KUBECTL" --kubeconfig "$STATE/kubeconfig" --request-timeout=2s -n default get serviceaccount default >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.5
  done
  [[ $ok -eq 1 ]] || { tail -25 "$STATE/kube-controller-manager.log" >&2; down_dir "$STATE"; die "no default ServiceAccount after ${WAIT_S}s (kube-controller-manager log $STATE/kube-controller-manager.log)"; }
  trap - ERR

  cat >"$STATE/env" <<ENV
export BITSFARM_E2E_KUBECONFIG=$STATE/kubeconfig
export BITSFARM_E2E_KUBECTL=$KUBECTL
export BITSFARM_E2E_AUDIT_LOG=$STATE/audit.log
export BITSFARM_E2E_STATE=$STATE
ENV
  log "cluster up in $((SECONDS - t0)) s: API https://127.0.0.1:$api, state $STATE"
  echo "$STATE"
}

down_dir() {
  local dir=$1 name pid i
  [[ -f $dir/pids ]] || { log "nothing to stop in $dir"; return 0; }
  # reverse order of start: controller-manager, apiserver, etcd
  tac "$dir/pids" | while read -r name pid; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      if kill -0 "$pid" 2>/dev/null; then log "$name ($pid) ignored TERM; KILL"; kill -KILL "$pid" 2>/dev/null || true; fi
      log "stopped $name ($pid)"
    fi
  done
  if [[ "${BITSFARM_KEEP_CLUSTER_STATE:-0}" == 1 ]]; then
    : >"$dir/pids"; log "kept $dir"
  else
    rm -rf "$dir"
  fi
}

run() {
  [[ $# -gt 0 ]] || die "usage: $0 run CMD..."
  local dir rc=0
  dir=$(up)
  # shellcheck disable=SC2064 # expand $dir now
  trap "down_dir '$dir'" EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  # shellcheck disable=SC1091
  . "$dir/env"
  "$@" || rc=$?
  if [[ $rc -ne 0 ]]; then
    export BITSFARM_KEEP_CLUSTER_STATE=1
    log "command failed ($rc); cluster logs kept in $dir"
  fi
  return $rc
}

cmd=${1:-}
shift || true
case "$cmd" in
  build) build ;;
  up) up "$@" ;;
  run) run "$@" ;;
  down) [[ -n "${1:-}" ]] || die "usage: $0 down DIR"; down_dir "$1" ;;
  env) resolve_bins; echo "cache: $BIN_DIR"; ls -la "$BIN_DIR" 2>/dev/null || true ;;
  *) echo "usage: $0 build | up [DIR] | down DIR | run CMD... | env" >&2; exit 2 ;;
esac
