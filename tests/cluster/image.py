#!/usr/bin/env python3
"""Container images for the test cluster, without a container engine or a registry.

    image.py build-stage --cache DIR
        Runs the Dockerfile's build stage (`FROM ... AS build`) here: DIR/context gets exactly what
        its COPY lines copy (synced, so DIR/context/target/ stays the cargo cache and an unchanged
        checkout rebuilds nothing), then each RUN command runs there with `sh -ec`. Prints the path
        of what the final stage's `COPY --from=build` takes (the release binary) as the last line.
    image.py bitsfarm --binary PATH --tag NAME:TAG --out FILE.tar
        The Dockerfile's final stage as an image archive: the binary where the final stage puts it,
        on the distroless cc base it names, emulated (the libraries `ldd` lists, /etc/passwd and
        /etc/group with the nonroot user, nsswitch.conf, CA certificates, /home/nonroot, /tmp), with
        the stage's USER, EXPOSE, ENTRYPOINT, CMD and the base's Env and WorkingDir.
    image.py pause --tag NAME:TAG --out FILE.tar
        tests/cluster/pause.c built with `gcc -static`: the pod sandbox image (user 65535).
    image.py busybox --tag NAME:TAG --out FILE.tar
        Debian's static /bin/busybox and a link for each applet (`sh`, `mkdir`, ...); cmd ["sh"].

Every archive is one tar holding both an OCI image layout (oci-layout, index.json naming the image,
blobs/sha256/...) and a docker `manifest.json` with RepoTags, as `docker save` writes since Docker
25, so `ctr -n k8s.io images import FILE.tar` (either of its importer paths) and `docker load` load
it under the right name. The one layer is an uncompressed tar. Archives are deterministic: sorted
entries, mtimes 0 (or SOURCE_DATE_EPOCH), owner 0 except the nonroot home, so the same inputs give
the same digests. The image commands print the fully qualified image reference as the last line.

The Dockerfile is read strictly: an instruction or flag this script does not implement (ARG, ENV,
ADD, COPY --chown, RUN --mount, heredocs, wildcards, ...) is an error that names the line, never a
guess. Python 3 standard library only. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import hashlib
import io
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[2]
PROG = "image.py"

# What distroless' base images carry in their config (gcr.io/distroless/{static,base,cc}).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DISTROLESS_ENV = [f"PATH={DEFAULT_PATH}", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"]
NONROOT_UID = 65532
PAUSE_UID = 65535
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

OCI_LAYOUT = "application/vnd.oci.image.layout.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"


class Fail(Exception):
    """An error for the user: printed as one message, exit status 1."""


def log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The Dockerfile


@dataclass
class Instruction:
    line: int
    keyword: str  # upper case
    args: str  # the rest, continuations joined

    def where(self) -> str:
        return f"Dockerfile line {self.line} ({self.keyword})"


@dataclass
class Stage:
    line: int
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


def read_dockerfile(path: Path) -> list[Stage]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise Fail(f"cannot read {path}: {e}") from e
    lines = text.splitlines()

    # Parser directives (`# syntax=...`, `# escape=...`) may only open the file.
    for raw in lines:
        m = re.match(r"^\s*#\s*([A-Za-z]+)\s*=\s*(.*?)\s*$", raw)
        if not m:
            break
        key, value = m.group(1).lower(), m.group(2)
        if key == "escape" and value != "\\":
            raise Fail(f"{path}: the escape directive ({value!r}) is not supported; only '\\'")
        if key not in ("syntax", "escape", "check"):
            break

    instructions: list[Instruction] = []
    current: list[str] = []
    start = 0
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue  # a comment, also between continuation lines
        if not current and not stripped:
            continue
        if current and not stripped:
            continue  # an empty continuation line (Docker warns and skips it)
        if not current:
            start = number
        body = raw.rstrip()
        if body.endswith("\\"):
            current.append(body[:-1])
            continue
        current.append(body)
        joined = "".join(current).strip()
        current = []
        parts = joined.split(None, 1)
        instructions.append(
            Instruction(start, parts[0].upper(), parts[1].strip() if len(parts) > 1 else "")
        )
    if current:
        raise Fail(f"{path}: line {start}: the file ends inside a line continuation")

    stages: list[Stage] = []
    for ins in instructions:
        if re.search(r"(^|\s)<<-?[\"']?[A-Za-z_]", ins.args):
            raise Fail(f"{ins.where()}: heredocs are not supported by {PROG}")
        if ins.keyword == "FROM":
            words = ins.args.split()
            if any(w.startswith("--") for w in words):
                raise Fail(f"{ins.where()}: FROM flags ({ins.args}) are not supported")
            if len(words) == 1:
                stages.append(Stage(ins.line, words[0], None))
            elif len(words) == 3 and words[1].upper() == "AS":
                stages.append(Stage(ins.line, words[0], words[2]))
            else:
                raise Fail(f"{ins.where()}: cannot read `FROM {ins.args}`")
            if "$" in words[0]:
                raise Fail(f"{ins.where()}: variables in FROM are not supported")
        elif not stages:
            raise Fail(
                f"{ins.where()}: only FROM may come before the first stage (ARG is not supported)"
            )
        else:
            stages[-1].instructions.append(ins)
    if not stages:
        raise Fail(f"{path}: no FROM")
    return stages


def json_or_words(ins: Instruction) -> list[str]:
    """The arguments of COPY in either form: JSON array, or words split on whitespace."""
    if ins.args.startswith("["):
        try:
            value = json.loads(ins.args)
        except json.JSONDecodeError as e:
            raise Fail(f"{ins.where()}: not a JSON array: {e}") from e
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise Fail(f"{ins.where()}: the JSON form must be an array of strings")
        return value
    if any(c in ins.args for c in "\"'"):
        raise Fail(f"{ins.where()}: quoted words are not supported; use the JSON form")
    return ins.args.split()


def exec_form(ins: Instruction) -> list[str]:
    """ENTRYPOINT/CMD: only the JSON (exec) form; the image has no shell for the other."""
    try:
        value = json.loads(ins.args)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Fail(f"{ins.where()}: only the JSON exec form is supported (the image has no shell)")
    return value


def split_flags(ins: Instruction, words: list[str]) -> tuple[dict[str, str], list[str]]:
    flags: dict[str, str] = {}
    rest = list(words)
    while rest and rest[0].startswith("--"):
        name, eq, value = rest.pop(0)[2:].partition("=")
        if not eq:
            raise Fail(f"{ins.where()}: flag --{name} without a value")
        flags[name] = value
    return flags, rest


def key_values(ins: Instruction) -> list[tuple[str, str]]:
    """`ENV`/`LABEL` in the KEY=VALUE form (no quotes, no variables)."""
    out = []
    for word in ins.args.split():
        key, eq, value = word.partition("=")
        if not eq or not key or any(c in word for c in "\"'$\\"):
            raise Fail(
                f"{ins.where()}: only unquoted KEY=VALUE pairs without variables are supported"
            )
        out.append((key, value))
    if not out:
        raise Fail(f"{ins.where()}: nothing to set")
    return out


@dataclass
class Copy:
    ins: Instruction
    sources: list[str]
    dest: str


@dataclass
class BuildStage:
    stage: Stage
    workdir: str
    copies: list[Copy]
    runs: list[Instruction]


def build_stage(stages: list[Stage]) -> BuildStage:
    build = next((s for s in stages if (s.name or "").lower() == "build"), None)
    if build is None:
        raise Fail("the Dockerfile has no `FROM ... AS build` stage")
    others = [s for s in stages if s is not build and s is not stages[-1]]
    if others:
        raise Fail(
            f"Dockerfile line {others[0].line}: a stage besides `build` and the final one; "
            f"{PROG} runs only those two"
        )
    workdir = None
    copies: list[Copy] = []
    runs: list[Instruction] = []
    for ins in build.instructions:
        if ins.keyword == "WORKDIR":
            if workdir is not None or copies or runs:
                raise Fail(f"{ins.where()}: only one WORKDIR, before any COPY or RUN, is supported")
            if not ins.args.startswith("/") or "$" in ins.args or len(ins.args.split()) != 1:
                raise Fail(f"{ins.where()}: WORKDIR must be one absolute path without variables")
            workdir = str(PurePosixPath(ins.args))
        elif ins.keyword == "COPY":
            flags, words = split_flags(ins, json_or_words(ins))
            if flags:
                raise Fail(
                    f"{ins.where()}: COPY flags ({', '.join('--' + f for f in flags)}) are not "
                    f"supported in the build stage"
                )
            if len(words) < 2:
                raise Fail(f"{ins.where()}: COPY needs a source and a destination")
            if workdir is None:
                raise Fail(f"{ins.where()}: COPY before WORKDIR is not supported")
            copies.append(Copy(ins, words[:-1], words[-1]))
        elif ins.keyword == "RUN":
            if ins.args.startswith("[") or ins.args.startswith("--"):
                raise Fail(
                    f"{ins.where()}: only the shell form of RUN, without flags, is supported"
                )
            if workdir is None:
                raise Fail(f"{ins.where()}: RUN before WORKDIR is not supported")
            runs.append(ins)
        else:
            raise Fail(
                f"{ins.where()}: {PROG} does not understand {ins.keyword} in the build stage; "
                f"teach it (tests/cluster/image.py) rather than let it guess"
            )
    if workdir is None or not runs:
        raise Fail(f"Dockerfile line {build.line}: the build stage needs a WORKDIR and a RUN")
    return BuildStage(build, workdir, copies, runs)


@dataclass
class FinalStage:
    stage: Stage
    binary_from: str  # absolute path in the build stage
    binary_to: str  # absolute path in the image
    user: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    exposed: list[str] = field(default_factory=list)
    env: list[tuple[str, str]] = field(default_factory=list)
    labels: list[tuple[str, str]] = field(default_factory=list)
    workdir: str | None = None


def final_stage(stages: list[Stage]) -> FinalStage:
    stage = stages[-1]
    if (stage.name or "").lower() == "build":
        raise Fail("the build stage is the last one: there is no final stage")
    found: FinalStage | None = None
    rest: list[Instruction] = []
    for ins in stage.instructions:
        if ins.keyword == "COPY":
            flags, words = split_flags(ins, json_or_words(ins))
            if set(flags) != {"from"} or flags["from"].lower() != "build":
                raise Fail(
                    f"{ins.where()}: the final stage may only `COPY --from=build <path> <path>` "
                    f"(no other flags, no copies from the context)"
                )
            if len(words) != 2 or not all(w.startswith("/") for w in words):
                raise Fail(
                    f"{ins.where()}: COPY --from=build needs one absolute source and destination"
                )
            if found is not None:
                raise Fail(f"{ins.where()}: only one COPY --from=build is supported")
            if any(c in words[0] for c in "*?["):
                raise Fail(f"{ins.where()}: wildcards are not supported")
            dest = words[1]
            if dest.endswith("/"):
                dest += PurePosixPath(words[0]).name
            found = FinalStage(stage, str(PurePosixPath(words[0])), str(PurePosixPath(dest)))
        else:
            rest.append(ins)
    if found is None:
        raise Fail(f"Dockerfile line {stage.line}: the final stage has no COPY --from=build")
    for ins in rest:
        if ins.keyword == "USER":
            if len(ins.args.split()) != 1 or "$" in ins.args:
                raise Fail(f"{ins.where()}: USER must be one word without variables")
            found.user = ins.args
        elif ins.keyword == "ENTRYPOINT":
            found.entrypoint = exec_form(ins)
        elif ins.keyword == "CMD":
            found.cmd = exec_form(ins)
        elif ins.keyword == "EXPOSE":
            for port in ins.args.split():
                if not re.fullmatch(r"\d+(/(tcp|udp|sctp))?", port):
                    raise Fail(f"{ins.where()}: cannot read port {port!r}")
                found.exposed.append(port if "/" in port else port + "/tcp")
        elif ins.keyword == "ENV":
            found.env.extend(key_values(ins))
        elif ins.keyword == "LABEL":
            found.labels.extend(key_values(ins))
        elif ins.keyword == "WORKDIR":
            if not ins.args.startswith("/") or "$" in ins.args or len(ins.args.split()) != 1:
                raise Fail(f"{ins.where()}: WORKDIR must be one absolute path without variables")
            found.workdir = str(PurePosixPath(ins.args))
        else:
            raise Fail(
                f"{ins.where()}: {PROG} does not understand {ins.keyword} in the final stage; "
                f"teach it (tests/cluster/image.py) rather than let it guess"
            )
    return found


# --------------------------------------------------------------------------------------------
# .dockerignore (the rules of moby/patternmatcher: the last matching pattern wins, `!` re-includes,
# a path is excluded when it or a folder above it matches)


def read_dockerignore(root: Path) -> list[tuple[bool, re.Pattern[str]]]:
    path = root / ".dockerignore"
    if not path.exists():
        return []
    rules = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:].strip()
        pattern = os.path.normpath(line).lstrip("/")
        if pattern in ("", "."):
            continue
        rules.append((negate, re.compile(glob_regex(pattern))))
    return rules


def glob_regex(pattern: str) -> str:
    out, i = ["^"], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out.append("(.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise Fail(f".dockerignore: unclosed [ in {pattern!r}")
            body = pattern[i + 1 : end]
            if body.startswith("^"):
                body = "!" + body[1:]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    out.append("$")
    return "".join(out)


def ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negate, rx in rules:
        if any(rx.match(p) for p in prefixes):
            result = not negate
    return result


# --------------------------------------------------------------------------------------------
# build-stage

CACHE_DIRS = ("target", "out")  # kept in the context between runs: the cargo cache and the output


@dataclass
class Wanted:
    files: dict[str, Path] = field(default_factory=dict)  # context path -> source file
    links: dict[str, str] = field(default_factory=dict)  # context path -> link target
    dirs: set[str] = field(default_factory=set)

    def add_parents(self, rel: str) -> None:
        parent = PurePosixPath(rel).parent
        while str(parent) != ".":
            self.dirs.add(str(parent))
            parent = parent.parent


def context_path(copy: Copy, workdir: str) -> str:
    """The COPY destination relative to WORKDIR (which is the context folder here)."""
    dest = copy.dest
    if dest.startswith("/"):
        rel = os.path.relpath(dest, workdir)
        if rel == ".." or rel.startswith("../"):
            raise Fail(f"{copy.ins.where()}: destination {dest} is outside WORKDIR {workdir}")
    else:
        rel = dest
    rel = os.path.normpath(rel)
    if rel.startswith(".."):
        raise Fail(f"{copy.ins.where()}: destination {dest} leaves WORKDIR")
    return "" if rel == "." else rel


def wanted_files(stage: BuildStage, root: Path) -> Wanted:
    rules = read_dockerignore(root)
    wanted = Wanted()

    def put(rel: str, kind: str, value, ins: Instruction) -> None:
        top = rel.split("/")[0]
        if top in CACHE_DIRS:
            raise Fail(f"{ins.where()}: copies into {top}/, which {PROG} keeps as the build cache")
        if kind == "dir":
            if rel in wanted.files or rel in wanted.links:
                raise Fail(f"{ins.where()}: {rel} is both a folder and a file in the context")
            wanted.dirs.add(rel)
        else:
            if rel in wanted.dirs:
                raise Fail(f"{ins.where()}: {rel} is both a folder and a file in the context")
            # A later COPY overwrites an earlier one, as in Docker.
            wanted.files.pop(rel, None)
            wanted.links.pop(rel, None)
            if kind == "file":
                wanted.files[rel] = value
            else:
                wanted.links[rel] = value
        wanted.add_parents(rel)

    for copy in stage.copies:
        dest = context_path(copy, stage.workdir)
        into_dir = copy.dest.endswith("/") or dest == "" or len(copy.sources) > 1
        if len(copy.sources) > 1 and not copy.dest.endswith("/"):
            raise Fail(f"{copy.ins.where()}: with several sources the destination must end with /")
        for src in copy.sources:
            if any(c in src for c in "*?[") or "$" in src:
                raise Fail(
                    f"{copy.ins.where()}: wildcards and variables in sources are not supported"
                )
            rel_src = os.path.normpath(src.lstrip("/"))
            if rel_src == ".." or rel_src.startswith("../"):
                raise Fail(f"{copy.ins.where()}: source {src} is outside the build context")
            path = root / rel_src if rel_src != "." else root
            if rel_src != "." and ignored(rel_src, rules):
                raise Fail(f"{copy.ins.where()}: source {src} is excluded by .dockerignore")
            if not os.path.lexists(path):
                raise Fail(f"{copy.ins.where()}: source {src} does not exist in {root}")
            if path.is_dir():
                # The folder's contents go into the destination (COPY src ./src).
                if dest:
                    put(dest, "dir", None, copy.ins)
                for dirpath, dirnames, filenames in os.walk(path):
                    dirnames.sort()
                    for name in sorted(dirnames + filenames):
                        full = Path(dirpath) / name
                        inner = full.relative_to(path).as_posix()
                        repo_rel = inner if rel_src == "." else f"{rel_src}/{inner}"
                        if ignored(repo_rel, rules):
                            if name in dirnames:
                                dirnames.remove(name)
                            continue
                        target = f"{dest}/{inner}" if dest else inner
                        if full.is_symlink():
                            put(target, "link", os.readlink(full), copy.ins)
                            if name in dirnames:
                                dirnames.remove(name)  # os.walk does not follow it anyway
                        elif full.is_dir():
                            put(target, "dir", None, copy.ins)
                        elif full.is_file():
                            put(target, "file", full, copy.ins)
                        else:
                            raise Fail(f"{copy.ins.where()}: {full} is not a file, folder or link")
            else:
                target = f"{dest}/{path.name}".lstrip("/") if into_dir else dest
                put(target, "file", path.resolve(), copy.ins)
    return wanted


def same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def sync_context(wanted: Wanted, context: Path) -> tuple[int, int]:
    """Make `context` hold exactly `wanted` (besides the cache folders). A file whose bytes did
    not change keeps its mtime, so cargo sees nothing new; a changed one gets the time of now."""
    context.mkdir(parents=True, exist_ok=True)
    changed = removed = 0
    # Remove what is no longer wanted (or is of another kind now); the cache folders stay.
    for dirpath, dirnames, filenames in os.walk(context):
        base = Path(dirpath)
        rel_base = base.relative_to(context).as_posix()
        if rel_base == ".":
            dirnames[:] = [d for d in dirnames if d not in CACHE_DIRS]
            filenames = [f for f in filenames if f not in CACHE_DIRS]
        for name in sorted(dirnames + filenames):
            full = base / name
            rel = name if rel_base == "." else f"{rel_base}/{name}"
            if full.is_symlink():
                keep = wanted.links.get(rel) == os.readlink(full)
            elif full.is_dir():
                keep = rel in wanted.dirs
            else:
                keep = rel in wanted.files
            if keep:
                continue
            removed += 1
            if full.is_dir() and not full.is_symlink():
                shutil.rmtree(full)
            else:
                full.unlink()
            if name in dirnames:
                dirnames.remove(name)
    for rel in sorted(wanted.dirs):
        (context / rel).mkdir(parents=True, exist_ok=True)
    for rel, target in sorted(wanted.links.items()):
        if not (context / rel).is_symlink():
            os.symlink(target, context / rel)
            changed += 1
    for rel, src in sorted(wanted.files.items()):
        dst = context / rel
        mode = stat.S_IMODE(src.stat().st_mode)
        if dst.is_file() and not dst.is_symlink() and same_file(src, dst):
            if stat.S_IMODE(dst.stat().st_mode) != mode:
                os.chmod(dst, mode)
            continue
        tmp = dst.with_name(f".{dst.name}.image-py-tmp")
        shutil.copyfile(src, tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, dst)
        changed += 1
    return changed, removed


# The environment of the RUN commands: what a clean `docker build` would have (a toolchain on
# PATH, a home, the network settings), nothing of the calling shell or of `cargo test` (its
# CARGO_* variables, RUSTFLAGS or CARGO_TARGET_DIR would change or move the build).
KEPT_ENV = re.compile(
    r"^(PATH|HOME|USER|LOGNAME|LANG|LC_ALL|TERM|TMPDIR|CARGO_HOME|RUSTUP_HOME|RUSTUP_TOOLCHAIN"
    r"|CARGO_BUILD_JOBS|CARGO_NET_.*|CARGO_HTTP_.*|CARGO_REGISTRIES_.*|SSL_CERT_FILE|SSL_CERT_DIR"
    r"|[Hh][Tt][Tt][Pp][Ss]?_[Pp][Rr][Oo][Xx][Yy]|[Nn][Oo]_[Pp][Rr][Oo][Xx][Yy])$"
)


def run_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if KEPT_ENV.match(k)}


def check_toolchain(stage: BuildStage, context: Path) -> None:
    """A note (not an error) when the local toolchain or Debian release is not the image's."""
    m = re.match(
        r"^(?:docker\.io/)?(?:library/)?rust:(\d+\.\d+)(?:\.\d+)?(?:-(\w+))?", stage.stage.image
    )
    if not m:
        log(f"note: the build stage's image {stage.stage.image} is not rust:X.Y-<debian>; "
            f"its commands run with the local toolchain")
        return
    want, codename = m.group(1), m.group(2)
    try:
        out = subprocess.run(["rustc", "--version"], cwd=context, env=run_env(),
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise Fail(f"rustc does not run ({e}); the build stage needs a Rust toolchain") from e
    have = re.search(r"(\d+\.\d+)\.\d+", out)
    if not have or have.group(1) != want:
        log(f"note: the image builds with Rust {want}, this machine has {out.strip()}")
    try:
        release = Path("/etc/os-release").read_text()
        local = re.search(r"^VERSION_CODENAME=(\S+)", release, re.M)
        if codename and local and local.group(1) != codename:
            log(f"note: the image builds on Debian {codename}, this machine is {local.group(1)} "
                f"(glibc may differ from the final image's)")
    except OSError:
        pass


def cmd_build_stage(args: argparse.Namespace) -> None:
    stages = read_dockerfile(args.dockerfile)
    stage = build_stage(stages)
    final = final_stage(stages)
    rel_out = os.path.relpath(final.binary_from, stage.workdir)
    if rel_out == ".." or rel_out.startswith("../"):
        raise Fail(
            f"the final stage copies {final.binary_from}, outside the build stage's WORKDIR "
            f"{stage.workdir}: {PROG} can only map paths below WORKDIR"
        )
    cache = Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    context = cache / "context"
    with open(cache / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another build in {cache} (lock {cache / '.lock'})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        wanted = wanted_files(stage, ROOT)
        changed, removed = sync_context(wanted, context)
        log(f"context {context}: {len(wanted.files)} files from {ROOT} "
            f"({changed} new or changed, {removed} removed)")
        check_toolchain(stage, context)
        env = run_env()
        for ins in stage.runs:
            log(f"RUN (Dockerfile line {ins.line}) in {context}: {ins.args}")
            try:
                done = subprocess.run(["sh", "-ec", ins.args], cwd=context, env=env,
                                      stdin=subprocess.DEVNULL, stdout=sys.stderr)
            except OSError as e:
                raise Fail(f"cannot run sh: {e}") from e
            if done.returncode != 0:
                raise Fail(f"{ins.where()} failed with status {done.returncode}: {ins.args}")
    binary = context / rel_out
    if not binary.is_file():
        raise Fail(
            f"the build stage ran, but {final.binary_from} (the final stage's COPY --from=build "
            f"source) is not there ({binary})"
        )
    print(binary)


# --------------------------------------------------------------------------------------------
# Image archives


def epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return 0
    if not value.isdigit():
        raise Fail(f"SOURCE_DATE_EPOCH must be a number of seconds, not {value!r}")
    return int(value)


def rfc3339(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def architecture() -> str:
    machine = platform.machine()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine)
    if arch is None:
        raise Fail(f"unknown machine {machine!r}: teach {PROG} its OCI architecture name")
    return arch


NAME_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"


def qualify(ref: str) -> tuple[str, str, str]:
    """NAME:TAG -> (fully qualified reference, familiar one for RepoTags, tag)."""
    if "@" in ref:
        raise Fail(f"--tag {ref}: digests are not supported, give NAME:TAG")
    path, _, last = ref.rpartition("/")
    name_last, colon, tag = last.partition(":")
    if not colon or not tag:
        raise Fail(f"--tag {ref}: give a tag (NAME:TAG)")
    if not re.fullmatch(r"[\w][\w.-]{0,127}", tag):
        raise Fail(f"--tag {ref}: {tag!r} is not a valid tag")
    parts = (path.split("/") if path else []) + [name_last]
    domain = None
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        domain = parts.pop(0)
    for p in parts:
        if not re.fullmatch(NAME_COMPONENT, p):
            raise Fail(f"--tag {ref}: {p!r} is not a valid name component (lower case)")
    if domain is None or domain in ("docker.io", "index.docker.io"):
        if len(parts) == 1:
            parts.insert(0, "library")
        repo = "/".join(parts)
        full = f"docker.io/{repo}:{tag}"
        familiar = f"{repo.removeprefix('library/')}:{tag}"
    else:
        full = familiar = f"{domain}/{'/'.join(parts)}:{tag}"
    return full, familiar, tag


@dataclass
class Entry:
    kind: str  # "dir", "file", "link"
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    data: bytes | None = None
    source: Path | None = None
    target: str = ""
    auto: bool = False  # a parent folder nobody asked for (yet)


class Layer:
    """A filesystem tree, written as one deterministic tar."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    @staticmethod
    def _key(path: str) -> str:
        clean = os.path.normpath("/" + path).lstrip("/")
        if not clean or clean.startswith(".."):
            raise Fail(f"bad path in the image: {path!r}")
        return clean

    def _parents(self, key: str) -> None:
        parent = PurePosixPath(key).parent
        while str(parent) != ".":
            existing = self.entries.get(str(parent))
            if existing is None:
                self.entries[str(parent)] = Entry("dir", 0o755, auto=True)
            elif existing.kind != "dir":
                raise Fail(f"/{parent} is a {existing.kind} in the image, not a folder")
            parent = parent.parent

    def _put(self, path: str, entry: Entry) -> None:
        key = self._key(path)
        old = self.entries.get(key)
        if old is not None:
            if old.kind == entry.kind == "dir":
                if not old.auto:
                    return  # asked for twice: the first one's owner and mode stay
            else:
                raise Fail(f"/{key} is put into the image twice")
        self._parents(key)
        self.entries[key] = entry

    def dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        self._put(path, Entry("dir", mode, uid=uid, gid=gid))

    def text(self, path: str, content: str, mode: int = 0o644) -> None:
        self._put(path, Entry("file", mode, data=content.encode()))

    def file(self, path: str, source: Path, mode: int | None = None) -> None:
        real = Path(os.path.realpath(source))
        if not real.is_file():
            raise Fail(f"{source} is not a file")
        if mode is None:
            mode = 0o755 if os.access(real, os.X_OK) else 0o644
        self._put(path, Entry("file", mode, source=real))

    def link(self, path: str, target: str) -> None:
        self._put(path, Entry("link", 0o777, target=target))

    def write(self, out, mtime: int) -> None:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key in sorted(self.entries):
                e = self.entries[key]
                info = tarfile.TarInfo(key)
                info.mtime, info.uid, info.gid, info.mode = mtime, e.uid, e.gid, e.mode
                info.uname = info.gname = ""
                if e.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif e.kind == "link":
                    info.type, info.linkname = tarfile.SYMTYPE, e.target
                    tar.addfile(info)
                elif e.data is not None:
                    info.size = len(e.data)
                    tar.addfile(info, io.BytesIO(e.data))
                else:
                    assert e.source is not None
                    info.size = e.source.stat().st_size
                    with open(e.source, "rb") as f:
                        tar.addfile(info, f)


def canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_archive(layer: Layer, config: dict, ref: str, out: Path, what: str) -> None:
    full, familiar, tag = qualify(ref)
    mtime = epoch()
    arch = architecture()
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".image-py-") as tmp:
        layer_path = Path(tmp) / "layer.tar"
        with open(layer_path, "wb") as f:
            layer.write(f, mtime)
        layer_hex = sha256_file(layer_path)
        layer_size = layer_path.stat().st_size

        image_config = {
            "architecture": arch,
            "os": "linux",
            "created": rfc3339(mtime),
            "config": {k: v for k, v in config.items() if v not in (None, [], {})},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_hex}"]},
            "history": [{"created": rfc3339(mtime), "created_by": f"tests/cluster/{PROG} {what}"}],
        }
        config_bytes = canonical(image_config)
        config_hex = hashlib.sha256(config_bytes).hexdigest()
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": f"sha256:{config_hex}",
                       "size": len(config_bytes)},
            "layers": [{"mediaType": MT_LAYER, "digest": f"sha256:{layer_hex}",
                        "size": layer_size}],
        }
        manifest_bytes = canonical(manifest)
        manifest_hex = hashlib.sha256(manifest_bytes).hexdigest()
        index = {
            "schemaVersion": 2,
            "mediaType": MT_INDEX,
            "manifests": [{
                "mediaType": MT_MANIFEST,
                "digest": f"sha256:{manifest_hex}",
                "size": len(manifest_bytes),
                "platform": {"architecture": arch, "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": full,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        }
        docker_manifest = [{
            "Config": f"blobs/sha256/{config_hex}",
            "RepoTags": [familiar],
            "Layers": [f"blobs/sha256/{layer_hex}"],
        }]
        small = {
            f"blobs/sha256/{config_hex}": config_bytes,
            f"blobs/sha256/{manifest_hex}": manifest_bytes,
            "index.json": canonical(index),
            "manifest.json": canonical(docker_manifest),
            "oci-layout": canonical({"imageLayoutVersion": "1.0.0"}),
        }
        names = sorted(list(small) + [f"blobs/sha256/{layer_hex}", "blobs", "blobs/sha256"])
        partial = Path(tmp) / "image.tar"
        with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name in names:
                info = tarfile.TarInfo(name)
                info.mtime, info.uid, info.gid = mtime, 0, 0
                info.uname = info.gname = ""
                if name in ("blobs", "blobs/sha256"):
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                elif name in small:
                    info.mode, info.size = 0o644, len(small[name])
                    tar.addfile(info, io.BytesIO(small[name]))
                else:
                    info.mode, info.size = 0o644, layer_size
                    with open(layer_path, "rb") as f:
                        tar.addfile(info, f)
        os.replace(partial, out)
    log(f"wrote {out}: {full} manifest sha256:{manifest_hex} config sha256:{config_hex} "
        f"layer sha256:{layer_hex} ({layer_size} bytes)")
    print(full)


def shared_libraries(binary: Path) -> list[str]:
    """The paths `ldd` lists for the binary (the loader included); [] for a static binary."""
    try:
        done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True,
                              env={**os.environ, "LC_ALL": "C"})
    except OSError as e:
        raise Fail(f"cannot run ldd: {e}") from e
    text = done.stdout + done.stderr
    if "not a dynamic executable" in text or "statically linked" in text:
        return []
    if done.returncode != 0:
        raise Fail(f"ldd {binary} failed: {text.strip()}")
    paths = []
    for line in done.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith("linux-vdso") or line.startswith("linux-gate"):
            continue
        if "=> not found" in line:
            raise Fail(f"ldd {binary}: a library is missing: {line}")
        m = re.match(r"^\S+\s+=>\s+(/\S+)\s+\(0x[0-9a-f]+\)$", line) or re.match(
            r"^(/\S+)\s+\(0x[0-9a-f]+\)$", line)
        if not m:
            raise Fail(f"ldd {binary}: cannot read the line {line!r}")
        paths.append(m.group(1))
    if not paths:
        raise Fail(f"ldd {binary} listed no libraries: {text.strip()}")
    return paths


def distroless_base(final: FinalStage) -> tuple[str, str]:
    """(user, workdir) of the distroless base the final stage names; refuses any other base."""
    image = final.stage.image
    m = re.fullmatch(r"(?:gcr\.io/distroless/)(cc|base|base-nossl)(-debian\d+)?(?::([\w.-]+))?"
                     r"(?:@sha256:[0-9a-f]{64})?", image)
    if not m:
        raise Fail(
            f"Dockerfile line {final.stage.line}: the final stage's base {image} is not a "
            f"distroless cc/base image, the only base {PROG} knows how to emulate"
        )
    if "nonroot" in (m.group(3) or ""):
        return str(NONROOT_UID), "/home/nonroot"
    return "0", "/"


def cmd_bitsfarm(args: argparse.Namespace) -> None:
    final = final_stage(read_dockerfile(args.dockerfile))
    base_user, base_workdir = distroless_base(final)
    binary = Path(args.binary)
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise Fail(f"--binary {binary} is not an executable file")

    layer = Layer()
    # The distroless base, as far as the binary needs it.
    layer.text("etc/passwd",
               "root:x:0:0:root:/root:/sbin/nologin\n"
               "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
               f"nonroot:x:{NONROOT_UID}:{NONROOT_UID}::/home/nonroot:/sbin/nologin\n")
    layer.text("etc/group", f"root:x:0:\nnobody:x:65534:\nnonroot:x:{NONROOT_UID}:\n")
    layer.text("etc/nsswitch.conf",
               "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
               "networks: files\nprotocols: files\nservices: files\n")
    if not Path(CA_BUNDLE).is_file():
        raise Fail(f"{CA_BUNDLE} is missing on this machine (install ca-certificates)")
    layer.file(CA_BUNDLE, Path(CA_BUNDLE), 0o644)
    layer.dir("home/nonroot", 0o700, NONROOT_UID, NONROOT_UID)
    layer.dir("root", 0o700)
    layer.dir("tmp", 0o1777)
    for lib in shared_libraries(binary):
        layer.file(lib, Path(lib))
    layer.file(final.binary_to, binary, 0o755)
    if final.workdir:
        layer.dir(final.workdir)

    env = dict(e.split("=", 1) for e in DISTROLESS_ENV)
    env.update(final.env)
    config = {
        "User": final.user or base_user,
        "Env": [f"{k}={v}" for k, v in env.items()],
        "Entrypoint": final.entrypoint,
        "Cmd": final.cmd,
        "WorkingDir": final.workdir or base_workdir,
        "ExposedPorts": {p: {} for p in sorted(set(final.exposed))},
        "Labels": dict(final.labels) or None,
    }
    write_archive(
        layer, config, args.tag, Path(args.out), "bitsfarm (the Dockerfile's final stage)"
    )


def cmd_pause(args: argparse.Namespace) -> None:
    source = ROOT / "tests/cluster/pause.c"
    with tempfile.TemporaryDirectory(prefix="image-py-pause-") as tmp:
        binary = Path(tmp) / "pause"
        try:
            done = subprocess.run(["gcc", "-static", "-O2", "-s", "-o", str(binary), str(source)],
                                  capture_output=True, text=True)
        except OSError as e:
            raise Fail(f"cannot run gcc: {e}") from e
        if done.returncode != 0:
            raise Fail(f"gcc -static {source} failed:\n{done.stderr.strip()}")
        if shared_libraries(binary):
            raise Fail(f"{binary} is not static")
        layer = Layer()
        layer.file("pause", binary, 0o755)
        config = {
            "User": f"{PAUSE_UID}:{PAUSE_UID}",
            "Env": [f"PATH={DEFAULT_PATH}"],
            "Entrypoint": ["/pause"],
            "WorkingDir": "/",
        }
        write_archive(layer, config, args.tag, Path(args.out), "pause (tests/cluster/pause.c)")


def cmd_busybox(args: argparse.Namespace) -> None:
    busybox = Path(os.path.realpath("/bin/busybox"))
    if not busybox.is_file():
        raise Fail("/bin/busybox is missing (install busybox-static)")
    if shared_libraries(busybox):
        raise Fail(f"{busybox} is linked dynamically; install busybox-static")
    try:
        listed = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                                check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        raise Fail(f"{busybox} --list-full failed: {e}") from e
    layer = Layer()
    layer.file("bin/busybox", busybox, 0o755)
    for applet in sorted(set(listed)):
        if applet.strip("/") != "bin/busybox":
            layer.link(applet, "/bin/busybox")
    for name in ("sh", "mkdir", "rm"):
        if f"bin/{name}" not in listed and f"usr/bin/{name}" not in listed:
            raise Fail(f"{busybox} has no {name} applet")
    layer.text("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"
                             "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n")
    layer.text("etc/group", "root:x:0:\nnobody:x:65534:\n")
    layer.dir("root", 0o700)
    layer.dir("tmp", 0o1777)
    config = {"Env": [f"PATH={DEFAULT_PATH}"], "Cmd": ["sh"], "WorkingDir": "/"}
    write_archive(layer, config, args.tag, Path(args.out), "busybox (Debian's busybox-static)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--dockerfile", type=Path, default=ROOT / "Dockerfile",
                        help="the Dockerfile to read (default: the repository's)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build-stage", help="run the Dockerfile's build stage; print the binary")
    p.add_argument(
        "--cache", required=True, help="folder kept between runs (context + cargo cache)"
    )
    p.set_defaults(func=cmd_build_stage)
    p = sub.add_parser("bitsfarm", help="the final stage's image, from a built binary")
    p.add_argument("--binary", required=True)
    p.add_argument("--tag", required=True, help="NAME:TAG, e.g. bitsfarm:0.1.0")
    p.add_argument("--out", required=True, help="the archive to write")
    p.set_defaults(func=cmd_bitsfarm)
    for name, func, help_text in (("pause", cmd_pause, "the pod sandbox image"),
                                  ("busybox", cmd_busybox, "a busybox image (cmd sh)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--tag", required=True, help="NAME:TAG")
        p.add_argument("--out", required=True, help="the archive to write")
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except Fail as e:
        log(f"ERROR: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
