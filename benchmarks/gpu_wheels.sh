#!/usr/bin/env bash
# The Python packages the GPU machine's image lacks (it has jax, flax, optax, chex, h5py, tensorboard, numpy), as
# wheels for its Python 3.12 on x86-64, into .whl/ (git-ignored): carry ".whl" in the device run of gpu_round.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pkg in gymnasium==1.4.0 mujoco==4.0.0 mujoco-core==4.0.0 mujoco-studio==4.0.0 tyro==1.0.17 farama-notifications docstring-parser typeguard shtab glfw pyopengl websockets; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl "$pkg"
done
du -sh .whl
