#!/usr/bin/env bash
# Install the edge-cbn device runtime and run it as a systemd service.
#
# For 64-bit Raspberry Pi OS (bookworm or later; any Debian-like aarch64 or x86_64 Linux works too).
# Run it as root from a checkout of the repository on the board:
#
#   sudo device/install.sh lite0.tflite
#
# where lite0.tflite (+ lite0.cbn.npz + lite0.calib.tflite beside it) was converted on a workstation with
#   python tools/convert.py --model efficientnet_lite0 -o lite0.tflite
#
# What it does (see device/README.md):
#   1. apt: python3, python3-venv, v4l-utils (and python3-picamera2 with --picamera2);
#   2. a virtual environment in PREFIX (default /opt/edge-cbn) with the runtime-only package from this
#      checkout: numpy, click, OpenCV (headless), flatbuffers, tflite, LiteRT.  No TensorFlow;
#   3. the model bundle into DATA (default /var/lib/edge-cbn), linked as DATA/model.tflite;
#   4. a system user, the unit /etc/systemd/system/edge-cbn.service and /etc/default/edge-cbn (extra
#      stream flags), then enables and (re)starts the service.
set -euo pipefail

PREFIX=${EDGE_CBN_PREFIX:-/opt/edge-cbn}
DATA=${EDGE_CBN_DATA:-/var/lib/edge-cbn}
SERVICE_USER=${EDGE_CBN_USER:-edge-cbn}
PORT=8080
EXTRA_ARGS=""
PICAMERA2=0
DO_APT=1
DO_SERVICE=1
DRY_RUN=0
MODEL=""

usage() {
  cat <<EOF
usage: sudo $0 [options] MODEL.tflite

  --prefix DIR     virtual environment (default: $PREFIX; env EDGE_CBN_PREFIX)
  --data DIR       model, calibration state and calibrated model (default: $DATA; env EDGE_CBN_DATA)
  --user NAME      service user (default: $SERVICE_USER; env EDGE_CBN_USER)
  --port N         browser preview port (default: $PORT)
  --picamera2      Raspberry Pi camera module through picamera2 (apt python3-picamera2)
  --args "FLAGS"   extra 'edge-cbn stream' flags, e.g. "--noise relative --eta 0.05"
                   (written to /etc/default/edge-cbn; edit it later and restart the service)
  --no-apt         do not install apt packages
  --no-service     no user, no systemd unit (just the environment and the model)
  --dry-run        print every command that would change the machine, change nothing
  -h, --help       this help

MODEL.tflite needs MODEL.cbn.npz beside it (refold sidecar) and, for calibration,
MODEL.calib.tflite and MODEL.sweep.tflite; all four come from 'python tools/convert.py ... -o MODEL.tflite'.
EOF
}

die() {
  echo "install.sh: $*" >&2
  exit 1
}

# Every command that changes the machine goes through run (or write_file): --dry-run prints it instead.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

write_file() { # write_file PATH < content
  if [ "$DRY_RUN" = 1 ]; then
    echo "+ write $1:"
    sed 's/^/    /'
  else
    cat >"$1"
  fi
}

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --data) DATA=${2:?--data needs a directory}; shift 2 ;;
    --user) SERVICE_USER=${2:?--user needs a name}; shift 2 ;;
    --port) PORT=${2:?--port needs a number}; shift 2 ;;
    --args) EXTRA_ARGS=${2?--args needs a value}; shift 2 ;;
    --picamera2) PICAMERA2=1; shift ;;
    --no-apt) DO_APT=0; shift ;;
    --no-service) DO_SERVICE=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) [ -z "$MODEL" ] || die "one model only (got $MODEL and $1)"; MODEL=$1; shift ;;
  esac
done

[ -n "$MODEL" ] || { usage >&2; die "give the converted MODEL.tflite"; }
case "$MODEL" in *.tflite) ;; *) die "$MODEL: expected a .tflite file" ;; esac
[ -f "$MODEL" ] || die "$MODEL: no such file"
SIDECAR="${MODEL%.tflite}.cbn.npz"
CALIB="${MODEL%.tflite}.calib.tflite"
SWEEP="${MODEL%.tflite}.sweep.tflite"
[ -f "$SIDECAR" ] || die "$SIDECAR missing: copy it with the model (tools/convert.py writes it beside the .tflite)"
case "$PORT" in '' | *[!0-9]*) die "--port must be a number" ;; esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -f "$REPO/pyproject.toml" ] || die "$REPO is not an edge-cbn checkout (no pyproject.toml)"

if [ "$DRY_RUN" = 0 ] && { [ "$DO_APT" = 1 ] || [ "$DO_SERVICE" = 1 ]; }; then
  [ "$(id -u)" = 0 ] || die "run as root (sudo), or use --no-apt --no-service with writable --prefix/--data"
fi

arch=${EDGE_CBN_ARCH:-$(uname -m)}
case "$arch" in
  aarch64 | x86_64 | armv7l) ;;
  *) echo "install.sh: warning: untested architecture $arch" >&2 ;;
esac

step() { echo "==> $*"; }

# 1. System packages ------------------------------------------------------------------------------------
if [ "$DO_APT" = 1 ]; then
  step "apt packages"
  packages=(python3 python3-venv python3-pip ca-certificates v4l-utils)
  [ "$PICAMERA2" = 0 ] || packages+=(python3-picamera2)
  export DEBIAN_FRONTEND=noninteractive
  run apt-get update -q
  run apt-get install -y -q --no-install-recommends "${packages[@]}"
fi

# 32-bit Raspberry Pi OS: PyPI has an armv7l wheel of tflite-runtime 2.14.0 for Python 3.11 but none of
# numpy<2 or opencv-python-headless (piwheels, which Raspberry Pi OS configures, may have them). Ask the
# configured index for all three before anything is built, so a board without them is refused in one
# sentence instead of failing halfway through hours of source builds.
if [ "$arch" = armv7l ]; then
  step "armv7l: prebuilt wheels of the runtime's dependencies"
  armv7l_tags=(--platform linux_armv7l)
  for glibc in $(seq 17 36); do armv7l_tags+=(--platform "manylinux_2_${glibc}_armv7l"); done
  run python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 "${armv7l_tags[@]}" \
    -d "${TMPDIR:-/tmp}/edge-cbn-armv7l" 'numpy<2' opencv-python-headless tflite-runtime >/dev/null 2>&1 ||
    die "32-bit Raspberry Pi OS (armv7l): no prebuilt wheel of numpy<2 or opencv-python-headless for" \
      "Python 3.11 on the configured package index (PyPI has none); install the 64-bit Raspberry Pi OS" \
      "or configure piwheels (device/README.md)."
fi

# 2. Virtual environment with the runtime-only package ----------------------------------------------------
step "virtual environment in $PREFIX"
venv_flags=()
pip_flags=()
if [ "$DRY_RUN" = 1 ]; then
  workdir=/tmp/edge-cbn-install.XXXXXX
else
  workdir=$(mktemp -d)
  trap 'rm -rf "$workdir"' EXIT
fi
# 64-bit boards install the pinned set that CI's board check runs (device/constraints.txt).
pins=()
[ "$arch" = armv7l ] || mapfile -t pins < <(grep -v '^#' "$REPO/device/constraints.txt")
if [ "$PICAMERA2" = 1 ]; then
  # picamera2 comes from apt: let the venv see the system packages, and keep the system numpy that
  # picamera2's compiled parts were built against (pip then picks an OpenCV wheel that supports it).
  venv_flags+=(--system-site-packages)
  sys_numpy=$(python3 -c 'import numpy; print(numpy.__version__)' 2>/dev/null) ||
    die "--picamera2: the system numpy is missing (apt install python3-numpy python3-picamera2)"
  mapfile -t pins < <(printf '%s\n' "${pins[@]}" | grep -v -e '^numpy==' -e '^opencv-python-headless==')
  pins+=("numpy==$sys_numpy")
fi
if [ "${#pins[@]}" -gt 0 ]; then
  printf '%s\n' "${pins[@]}" | write_file "$workdir/constraints.txt"
  pip_flags+=(--constraint "$workdir/constraints.txt")
fi
run python3 -m venv "${venv_flags[@]}" "$PREFIX"
run "$PREFIX/bin/python" -m pip install -q --upgrade pip
# Build from a copy so the checkout stays clean (pip builds in the source tree).
run mkdir "$workdir/src"
run tar -C "$REPO" --exclude=.git --exclude=build --exclude='*.egg-info' --exclude=__pycache__ \
  --exclude=.pytest_cache --exclude=tests --exclude=.benchmarks -cf "$workdir/src.tar" .
run tar -C "$workdir/src" -xf "$workdir/src.tar"
# Base dependencies only: no [convert] extra, so no TensorFlow on the board.
run "$PREFIX/bin/python" -m pip install -q "${pip_flags[@]}" "$workdir/src"
run "$PREFIX/bin/edge-cbn" --version
if [ "$DRY_RUN" = 0 ] && "$PREFIX/bin/python" -c 'import tensorflow' 2>/dev/null; then
  echo "install.sh: warning: TensorFlow is importable in $PREFIX (not needed on the device)" >&2
fi

# 3. The model bundle -------------------------------------------------------------------------------------
step "model bundle into $DATA"
run mkdir -p "$DATA"
name=$(basename "$MODEL")
# Keep the exported names (the sidecar refers to the calibration variant by its file name) and point
# model.tflite / model.cbn.npz at them.
run install -m 0644 "$MODEL" "$DATA/$name"
run install -m 0644 "$SIDECAR" "$DATA/${name%.tflite}.cbn.npz"
if [ -f "$CALIB" ]; then
  run install -m 0644 "$CALIB" "$DATA/${name%.tflite}.calib.tflite"
else
  echo "install.sh: warning: $CALIB missing: the stream will run but cannot calibrate" >&2
fi
if [ -f "$SWEEP" ]; then
  run install -m 0644 "$SWEEP" "$DATA/${name%.tflite}.sweep.tflite"
else
  echo "install.sh: warning: $SWEEP missing: calibration goes depth first, one BN layer per frame (slower)" >&2
fi
if [ "$name" != model.tflite ]; then
  run ln -sfn "$name" "$DATA/model.tflite"
  run ln -sfn "${name%.tflite}.cbn.npz" "$DATA/model.cbn.npz"
fi

# 4. Service ------------------------------------------------------------------------------------------------
if [ "$DO_SERVICE" = 1 ]; then
  step "service user $SERVICE_USER and edge-cbn.service"
  if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    run useradd --system --home-dir "$DATA" --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
  fi
  for group in video render; do
    if getent group "$group" >/dev/null; then run usermod -a -G "$group" "$SERVICE_USER"; fi
  done
  run chown -R "$SERVICE_USER:" "$DATA"
  args="$EXTRA_ARGS"
  [ "$PICAMERA2" = 0 ] || args="--picamera2 $args"
  if [ ! -f /etc/default/edge-cbn ] || [ -n "$args" ]; then
    write_file /etc/default/edge-cbn <<EOF
# Extra flags for 'edge-cbn stream' (see: $PREFIX/bin/edge-cbn stream --help), e.g.
#   EDGE_CBN_ARGS="--noise relative --eta 0.05"
# then: sudo systemctl restart edge-cbn
EDGE_CBN_ARGS="${args% }"
EOF
  fi
  sed -e "s|/opt/edge-cbn|$PREFIX|g" -e "s|/var/lib/edge-cbn|$DATA|g" \
    -e "s|^User=.*|User=$SERVICE_USER|" -e "s|--serve 8080|--serve $PORT|" \
    "$REPO/device/edge-cbn.service" | write_file /etc/systemd/system/edge-cbn.service
  run systemctl daemon-reload
  run systemctl enable edge-cbn.service
  run systemctl restart edge-cbn.service
  host=$(hostname -I 2>/dev/null | awk '{print $1}')
  step "done: preview at http://${host:-<board address>}:$PORT/   logs: journalctl -u edge-cbn -f"
else
  step "done (no service): $PREFIX/bin/edge-cbn stream --model $DATA/model.tflite --headless --serve $PORT"
fi
