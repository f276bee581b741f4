#!/usr/bin/env bash
# On a CUDA machine (torch, transformers, peft and pytest installed; nothing fetched, random
# weights only): the CUDA tests, SRLoRA's step overhead against PEFT LoRA in one process (bf16,
# BERT-base and 1B-decoder shapes), a whole paper-scale run against PEFT LoRA (MiniLM shapes, init and
# every switch included), the device-sync counts per step and per switch, and the Trainer's FSDP2
# (fsdp_config={"fsdp_version": 2}, one rank per GPU), Accelerate's FSDP2 plugin and Lightning's
# DeepSpeedStrategy (ZeRO-3) against one process, all written to one file.
#
#   bash scripts/gpu_check.sh [OUT_FILE]        # default gpu_check.md; about 6 minutes on an H100 (estimated: the last two sections have not run yet)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check.md}
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
  echo "# scripts/gpu_check.sh"
  echo
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
  echo
  echo "## CUDA tests (tests/test_cuda.py)"
  echo '```'
  timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -20
  echo '```'
  echo
  echo "## Device-to-host syncs per step (benchmarks/gpu_syncs.py)"
  timeout 60 $PY benchmarks/gpu_syncs.py 2>&1 | grep -v -i warn
  echo
  echo "## Step overhead, BERT-base shapes, bf16 weights (benchmarks/step_overhead.py)"
  echo '```'
  timeout 90 $PY benchmarks/step_overhead.py --base-size --device cuda --dtype bfloat16 --batch-size 32 \
    --seq-len 128 --steps 30 --r-target 64 --json "${OUT%.md}_bert_base.json" 2>&1 | grep -v -i warn
  echo '```'
  echo
  echo "## A whole run against PEFT LoRA, MiniLM shapes at paper scale (benchmarks/run_overhead.py)"
  echo '```'
  timeout 240 $PY benchmarks/run_overhead.py --minilm-shapes --device cuda --steps 2000 --r-target 256 --rounds 1 \
    --layer-by-layer --json "${OUT%.md}_run_overhead.json" 2>&1 | grep -v -i warn
  echo '```'
  echo
  echo "## Step overhead, 1B decoder shapes, bf16 weights (benchmarks/step_overhead.py)"
  echo '```'
  timeout 150 $PY benchmarks/step_overhead.py --decoder-1b --device cuda --dtype bfloat16 --batch-size 8 \
    --seq-len 512 --steps 20 --r-target 64 --skip-full-init --json "${OUT%.md}_decoder_1b.json" 2>&1 | grep -v -i warn
  echo '```'
  echo
  echo "## The Trainer's FSDP2 against one process (tests/trainer_zero3_worker.py --fsdp2)"
  echo '```'
  TMP=$(mktemp -d)
  NGPU=$(nvidia-smi -L | wc -l)
  timeout 120 $PY tests/trainer_zero3_worker.py "$TMP" --reference 2>&1 | tail -3
  for RUN in "--tag fsdp2 --export" "--tag killed --stop-at 33" "--tag killed --resume"; do  # whole, killed, resumed
    DS_ACCELERATOR=cuda timeout 150 $PY -m torch.distributed.run --standalone --nproc_per_node "$NGPU" \
      tests/trainer_zero3_worker.py "$TMP" --fsdp2 $RUN 2>&1 | grep -i -E "error|exception" | tail -5
  done
  timeout 60 $PY - "$TMP" "$NGPU" <<'EOF'
import sys, torch
out, n = sys.argv[1], int(sys.argv[2])
one = torch.load(f"{out}/trainer-reference.pt", weights_only=False)
key = lambda h: [(e["step"], e["layer"], e["slots"], e["directions"], e["evicted"]) for e in h]
for k in range(n):
    rank = torch.load(f"{out}/trainer-fsdp2-rank{k}.pt", weights_only=False)
    err = max(float((rank["weights"][name] - w).norm() / w.norm()) for name, w in one["weights"].items())
    print(f"rank {k}: kinds {rank['kinds']}, same switches {key(rank['history']) == key(one['history'])} "
          f"({len(one['history'])} layer switches), largest relative weight error {err:.2e} (goal < 1e-5)")
    again = torch.load(f"{out}/trainer-killed-rank{k}.pt", weights_only=False)
    exact = again["history"] == rank["history"] and all(torch.equal(again["weights"][n], w) for n, w in rank["weights"].items())
    print(f"rank {k}: killed at step 33, resumed from checkpoint-30: bit-equal to the whole run: {exact}")
import peft
sys.path.insert(0, "tests")
from conftest import CASES, make_base
probe = CASES["bert"].batch(torch.Generator().manual_seed(5))
logits = {}
for tag in ("reference", "fsdp2"):
    model = peft.PeftModel.from_pretrained(make_base(CASES["bert"]), f"{out}/adapter-{tag}").eval()
    with torch.no_grad():
        logits[tag] = model(input_ids=probe["input_ids"]).logits
err = float((logits["fsdp2"] - logits["reference"]).abs().max())
print(f"the adapter exported from the FSDP2 run, loaded in plain PEFT: logits within {err:.2e} of the one-process export (goal < 1e-4)")
EOF
  echo '```'
  echo
  echo "## Accelerate's FSDP2 plugin and Lightning's DeepSpeedStrategy (ZeRO-3) against one process"
  echo '```'
  DS_ACCELERATOR=cuda timeout 150 $PY -m torch.distributed.run --standalone --nproc_per_node "$NGPU" \
    tests/accelerate_zero3_worker.py "$TMP" --fsdp2 2>&1 | grep -i -E "error|exception" | tail -5
  timeout 120 $PY tests/lightning_ddp_worker.py "$TMP" --reference --config 2>&1 | grep -i -E "error|exception" | tail -3
  DS_ACCELERATOR=cuda timeout 200 $PY -m torch.distributed.run --standalone --nproc_per_node "$NGPU" \
    tests/lightning_ddp_worker.py "$TMP" --config --deepspeed 3 2>&1 | grep -i -E "error|exception" | tail -5
  timeout 60 $PY - "$TMP" "$NGPU" <<'EOF'
import sys, torch
out, n = sys.argv[1], int(sys.argv[2])
key = lambda h: [(e["step"], e["layer"], e["slots"], e["directions"], e["evicted"]) for e in h]
as_dicts = lambda h: [e if isinstance(e, dict) else e.to_dict() for e in h]
runs = (("Accelerate FSDP2 plugin", "trainer-reference.pt", "accelerate-fsdp2-rank{}.pt", 1e-5),
        ("Lightning DeepSpeed ZeRO-3", "lightning-reference-rank0.pt", "lightning-config-zero3-rank{}.pt", 1e-3))
for what, ref, name, goal in runs:
    one = torch.load(f"{out}/{ref}", weights_only=False)
    for k in range(n):
        rank = torch.load(f"{out}/{name.format(k)}", weights_only=False)
        same = key(as_dicts(rank["history"])) == key(as_dicts(one["history"]))
        err = max(float((rank["weights"][m] - w).norm() / w.norm()) for m, w in one["weights"].items())
        print(f"{what}, rank {k}: kinds {rank.get('kinds')}, same switches {same} "
              f"({len(one['history'])} layer switches), largest relative weight error {err:.2e} (goal < {goal:g})")
EOF
  echo '```'
} > "$OUT" 2>&1
cat "$OUT"
