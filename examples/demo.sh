#!/usr/bin/env bash
# The bundled default: a tiny HCX model pretrained in CPU mode on bundled real text, then exported.
#   1. train the morpheme-aware byte-level BPE tokenizer on examples/data (Korean, English, code)
#   2. preprocess the same text into Megatron .bin/.idx (one prefix per language) and blend them
#   3. pretrain hcx-tiny at TP=2 x PP=2 on 4 CPU processes (gloo), saving dist checkpoints
#   4. export the checkpoint to a Hugging Face Llama directory and verify logits against transformers
# Everything lands under $RUN_DIR (default runs/demo). Override STEPS / NPROC / TP / PP from the environment.
set -euo pipefail
# megatron-core warns at import about missing apex/TE and CUDA settings; keep the demo log readable.
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/demo}
STEPS=${STEPS:-60}
TP=${TP:-2}
PP=${PP:-2}
NPROC=${NPROC:-$((TP * PP))}
VOCAB=${VOCAB:-4096}
mkdir -p "$RUN_DIR/data"

echo "== 1/4 tokenizer (vocab $VOCAB) -> $RUN_DIR/tokenizer"
python tools/train_tokenizer.py --input examples/data/ko.jsonl examples/data/en.jsonl examples/data/code.jsonl \
    --json-keys text --vocab-size "$VOCAB" --output "$RUN_DIR/tokenizer"

echo "== 2/4 preprocess -> $RUN_DIR/data"
for lang in ko en code; do
    python tools/preprocess_data.py --input "examples/data/$lang.jsonl" --output-prefix "$RUN_DIR/data/$lang" \
        --tokenizer-model "$RUN_DIR/tokenizer" --json-keys text --append-eod --workers 1
done

echo "== 3/4 pretrain hcx-tiny, TP=$TP x PP=$PP on $NPROC CPU processes"
# HCX's data mix: about one third Korean, one third English, one third code.
python -m torch.distributed.run --nproc-per-node "$NPROC" --master-port "${MASTER_PORT:-29517}" \
    -m hcx_megatron.pretrain --device cpu --model-preset hcx-tiny \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --data-path 0.34 "$RUN_DIR/data/ko_text_document" 0.33 "$RUN_DIR/data/en_text_document" \
                0.33 "$RUN_DIR/data/code_text_document" \
    --tokenizer-model "$RUN_DIR/tokenizer" --split 95,5,0 \
    --seq-length 256 --micro-batch-size 4 --global-batch-size 16 --train-iters "$STEPS" \
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 5 --use-distributed-optimizer \
    --fim-rate 0.1 --fim-spm-rate 0.5 \
    --eval-interval 20 --eval-iters 2 --log-interval 5 \
    --save "$RUN_DIR/checkpoints" --save-interval 20 --load "$RUN_DIR/checkpoints" \
    --metrics-jsonl "$RUN_DIR/metrics.jsonl" --tensorboard-dir "$RUN_DIR/tensorboard"

echo "== 4/4 export to Hugging Face -> $RUN_DIR/hf"
python tools/convert_checkpoint.py to-hf --load "$RUN_DIR/checkpoints" --save "$RUN_DIR/hf" \
    --tokenizer-model "$RUN_DIR/tokenizer" --verify

echo "done: metrics $RUN_DIR/metrics.jsonl, checkpoints $RUN_DIR/checkpoints, HF model $RUN_DIR/hf"
