#!/usr/bin/env bash
# Pack what `make gpu-check` needs beyond a CUDA machine's own PyTorch image, for a machine with no
# network and no Java:
#   OUT/wheels/   TorchServe, its archiver, captum, pyyaml, psutil: the versions requirements.txt
#                 pins, for Python PYVER (default 3.12) on x86-64 Linux
#   OUT/jre/      a Java 17 runtime cut down with jlink to the modules TorchServe uses, as .tar.xz
#                 pieces
#   OUT/install.sh  run there from the repo root: a venv (default .venv-gpu) that sees the
#                 machine's torch, the wheels installed into it, the JRE unpacked into it
# Each folder stays under 60 MB, so each fits one transfer; carry them one at a time if need be.
#   bench/pack_offline.sh pack            # here (needs pip's index and a JDK 17 with jlink)
#   bash pack/install.sh && . .venv-gpu/env && make gpu-check VENV=.venv-gpu GPU_OUT=...   # there
set -euo pipefail
out=${1:?usage: bench/pack_offline.sh OUT [PYVER]}
pyver=${2:-3.12}
root=$(cd "$(dirname "$0")/.." && pwd)
limit=$((60 * 1000 * 1000))

pin() { grep -i "^$1==" "$root/requirements.txt"; }
rm -rf "$out/wheels" "$out/jre"
mkdir -p "$out/wheels" "$out/jre"
# --no-deps: the CUDA image has torch, numpy, Pillow, requests, packaging; these are what it lacks.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$out/wheels" \
  "$(pin torchserve)" "$(pin torch-model-archiver)" "$(pin captum)" "$(pin pyyaml)" \
  "$(pin psutil)"

jre=$(mktemp -d)
trap 'rm -rf "$jre"' EXIT
jlink --add-modules java.base,java.logging,java.management,java.naming,java.sql,java.xml,java.desktop,jdk.unsupported,jdk.crypto.ec,java.net.http \
  --compress=2 --no-header-files --no-man-pages --strip-debug --output "$jre/jre"
tar -C "$jre" -cJf - jre | split -b 50M -d - "$out/jre/jre.tar.xz.part-"

cat > "$out/install.sh" <<'EOF'
#!/usr/bin/env bash
# Install the pack into VENV (default .venv-gpu), from the repo root, with no network. The venv
# sees the system's packages (the CUDA image's torch); `. VENV/env` puts its Java on the PATH.
set -euo pipefail
pack=$(cd "$(dirname "$0")" && pwd)
venv=${1:-.venv-gpu}
if [ -d "$pack/wheels" ]; then
  python3 -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install -q --no-index --no-deps "$pack"/wheels/*.whl
  touch "$venv/bin/torchserve"  # newer than requirements.txt: make does not reinstall
fi
if compgen -G "$pack/jre/jre.tar.xz.part-*" >/dev/null; then
  mkdir -p "$venv"
  cat "$pack"/jre/jre.tar.xz.part-* | tar -C "$venv" -xJf -
fi
printf 'export JAVA_HOME=%s\nexport PATH=%s:$PATH\n' "$(cd "$venv" && pwd)/jre" \
  "$(cd "$venv" && pwd)/jre/bin" > "$venv/env"
"$venv/jre/bin/java" -version 2>&1 | head -n 1
"$venv/bin/python" -c "import torch, ts, model_archiver; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
EOF
chmod +x "$out/install.sh"

for folder in "$out/wheels" "$out/jre"; do
  size=$(du -sb "$folder" | cut -f1)
  echo "$folder: $((size / 1000000)) MB"
  [ "$size" -le "$limit" ] || { echo "$folder is over 60 MB: split it"; exit 1; }
done
