#!/bin/bash
# One GPU lease: the deep study (configs/sweep_deep_gpu.toml, 5 seeds x 2 arms, GPU input draw)
# for a fixed wall-clock budget, beside the shallow lambda = 1.8 arm's seeds 5-9 (host draw,
# resumed from their CPU checkpoints); both stopped with SIGINT at the budget (runs keep their
# last checkpoint), then packed into $OUT.   Usage: bash .carry/gpu_deep.sh SWEEP_SECONDS
set -u
t0=$(date +%s)
budget=${1:-450}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MNIST_DIR=$PWD/.carry/mnist
# Brian2 2.9 names ndarray.ptp, gone in NumPy 2.4; the image has NumPy 2.5 (docs/gpu.md)
sed -i 's/np\.ndarray\.ptp/np.ptp/' /tmp/site/brian2/units/fundamentalunits.py
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee $OUT/gpu.txt
python3 -c "import numpy, cupy, brian2, distributed; print('numpy', numpy.__version__, 'cupy', cupy.__version__, 'brian2', brian2.__version__, 'distributed', distributed.__version__, 'cuda', cupy.cuda.runtime.runtimeGetVersion())" 2>&1 | tee -a $OUT/gpu.txt
nproc | tee -a $OUT/gpu.txt
nvidia-smi dmon -s u -d 5 > $OUT/dmon.txt 2>&1 &
dmon=$!
echo "setup took $(( $(date +%s) - t0 )) s"
ts=$(date +%s)
timeout -s INT -k 90 $budget python3 -m protocols.sweep --config configs/sweep_deep_gpu.toml \
    --workers 10 --threads 1 --no-progress > $OUT/sweep_deep.log 2>&1 &
deep=$!
timeout -s INT -k 90 $budget python3 -m protocols.sweep --config configs/sweep_shallow.toml \
    --arms pretrained --seeds 5 6 7 8 9 --iterations 6000 --array-module cupy \
    --out results/shallow_mnist_window18/runs --workers 5 --threads 1 --no-progress \
    > $OUT/sweep_shallow.log 2>&1
echo "shallow sweep rc $? after $(( $(date +%s) - ts )) s"
wait $deep
echo "deep sweep rc $? after $(( $(date +%s) - ts )) s"
kill $dmon
tail -3 $OUT/sweep_shallow.log $OUT/sweep_deep.log
for f in runs/sweep_deep_gpu/*/lee/*/seed*/metrics.csv results/shallow_mnist_window18/runs/*/lee/pretrained/seed[5-9]/metrics.csv; do
    echo "$f $(tail -1 $f | cut -d, -f1-8)"; done
tar czf /tmp/deep.tgz runs/sweep_deep_gpu results/shallow_mnist_window18/runs/*/lee/pretrained/seed[5-9] \
    && split -b 15M /tmp/deep.tgz $OUT/runs.tgz.part_ && ls -la $OUT
echo "total $(( $(date +%s) - t0 )) s"
