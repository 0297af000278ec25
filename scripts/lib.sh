# Shared steps of scripts/setup, scripts/test and scripts/bench. Source it; run as root.

AGENT_TARGET=x86_64-unknown-linux-musl

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "error: run this as root (agentbox creates namespaces, cgroups and mounts)" >&2
    exit 1
  fi
}

# Debian packages the tests need besides: a real registry and skopeo (image pulls),
# htpasswd (its auth), python3-venv (the e2b and mcp client packages from PyPI).
TEST_PACKAGES=(docker-registry skopeo apache2-utils python3-venv)

# Debian packages agentbox needs: a C compiler (bundled SQLite), debootstrap (the base
# template), busybox-static (the mini template), and the usual download tools; plus the
# arguments. docker-registry's service is masked before it is installed on a systemd host
# (the tests run their own registries on loopback; none should listen on port 5000).
install_packages() {
  local want=(gcc libc6-dev pkg-config debootstrap busybox-static ca-certificates curl e2fsprogs btrfs-progs nftables iproute2 util-linux "$@")
  local missing=()
  for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [[ " ${missing[*]} " == *" docker-registry "* ]] && [ -d /run/systemd/system ] \
       && [ ! -e /etc/systemd/system/docker-registry.service ]; then
      ln -s /dev/null /etc/systemd/system/docker-registry.service
    fi
    echo "==> apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# A Rust toolchain (rustup's; Debian 12's rustc is too old for this workspace).
ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "==> installing Rust with rustup"
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
}

# The guest agent runs as PID 1 inside images that may have no libc: it must be static.
# Prefer musl; fall back to a static glibc build when the musl target cannot be added.
build_static() {
  local profile_flag=$1; shift
  local dir
  if rustup target list --installed 2>/dev/null | grep -q "^$AGENT_TARGET$" \
     || rustup target add "$AGENT_TARGET" >/dev/null 2>&1; then
    cargo build $profile_flag --locked --target "$AGENT_TARGET" "$@"
    dir=target/$AGENT_TARGET
  else
    echo "==> musl target unavailable; building the agent as static glibc"
    RUSTFLAGS="-C target-feature=+crt-static" cargo build $profile_flag --locked \
      --target x86_64-unknown-linux-gnu "$@"
    dir=target/x86_64-unknown-linux-gnu
  fi
  if [ "$profile_flag" = "--release" ]; then STATIC_DIR=$dir/release; else STATIC_DIR=$dir/debug; fi
  export STATIC_DIR
}

wait_for_socket() {
  # Up to 20 s for the daemon to answer on its socket (a socket file left by a daemon that
  # died does not count: it has to accept a connection).
  local sock=$1
  for _ in $(seq 1 400); do
    if [ -S "$sock" ] && curl -s -o /dev/null --max-time 1 --unix-socket "$sock" http://agentbox/v1/system; then
      return 0
    fi
    sleep 0.05
  done
  echo "error: the daemon did not answer on $sock" >&2
  return 1
}

# The e2b Python SDK, at the version the tests pin, in the venv the tests use
# (/var/cache/agentbox/e2b-venv-VERSION, made under the same flock); sets E2B_VERSION
# and E2B_VENV. Needs python3-venv and PyPI.
e2b_venv() {
  E2B_VERSION=$(sed -n 's/^const E2B_VERSION: &str = "\(.*\)";/\1/p' tests/integration/e2b.rs)
  E2B_VENV=/var/cache/agentbox/e2b-venv-$E2B_VERSION
  mkdir -p /var/cache/agentbox
  (
    flock 9
    if [ ! -e "$E2B_VENV/.installed" ]; then
      echo "==> e2b $E2B_VERSION into $E2B_VENV"
      rm -rf "$E2B_VENV"
      python3 -m venv "$E2B_VENV"
      "$E2B_VENV/bin/pip" install -q --disable-pip-version-check "e2b==$E2B_VERSION"
      touch "$E2B_VENV/.installed"
    fi
  ) 9>"/var/cache/agentbox/e2b-venv-$E2B_VERSION.lock"
  export E2B_VERSION E2B_VENV
}
