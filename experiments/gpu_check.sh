#!/usr/bin/env bash
# The GPU path in one command, from a fresh checkout on a machine with an NVIDIA GPU (issue 11, item 5):
#
#     bash experiments/gpu_check.sh
#
# Budget: under 8 minutes on one GPU (the install is most of it). It has NOT been run yet: no GPU machine was
# lent to the sessions that wrote it (experiments/RESULTS.md says so until one has). Steps:
#   1. a venv with the CUDA build of torch 2.13.0 (PyPI's Linux default, the one vLLM 0.32 is built against)
#   2. CUDA parity of every deterministic merge method against the CPU merge (experiments/gpu_parity.py,
#      tolerance 1e-5 of each tensor's largest entry: a GPU may sum in another order)
#   3. merge speed on the GPU (experiments/bench_merge.py --device cuda)
#   4. fast vs lean session memory on the GPU (experiments/bench_memory.py --device cuda)
#   5. the vLLM checks (issue 12): the CUDA vllm 0.32.0 build, then bench_eval.py --vllm on the GPU (swap
#      inside the running engine vs HF vs an engine restart per candidate, vLLM's and HF's per-item scores
#      asserted equal; tests/test_vllm.py pins its workers to the CPU build, so it is not run here)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install -q -e '.[test]'
python=$PWD/.venv-gpu/bin/python
"$python" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__, torch.cuda.get_device_name())"
cd experiments
timeout 120 "$python" gpu_parity.py --device cuda --size 25M
timeout 150 "$python" bench_merge.py --device cuda --sizes 25M,100M --methods linear,task_arithmetic,ties,slerp
timeout 150 "$python" bench_memory.py --device cuda --size 270M
(cd .. && .venv-gpu/bin/pip install -q -e '.[test,vllm]')
timeout 200 "$python" bench_eval.py --vllm --device cuda --sizes demo --candidates 4
