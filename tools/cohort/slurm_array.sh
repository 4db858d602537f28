#!/usr/bin/env bash
# Slurm job array over a slide cohort: task i of N runs `wsltool cohort infer --shard i/N` (no Dask).
#
#   sbatch --array=0-15 tools/cohort/slurm_array.sh cohort.csv /scratch/run1 model.pt [more cohort-infer options]
#
# Every task writes into the same OUTDIR (shared file system): OUTDIR/<slide-id>.zarr, .result.json, and
# OUTDIR/results.csv is rebuilt from all result files, so tasks never overwrite each other's rows.
# Shards are disjoint (slides sorted by id, every N-th), so tasks never race for a slide; the per-slide
# locks still protect against a task running twice (requeue) or overlapping a Dask run on the same OUTDIR.
# Re-submitting the same array after a timeout or node failure skips finished slides and resumes
# half-done ones. A task exits 1 when one of its slides failed (see the `error` column).
# Summary at any time:   python tools/cohort/summarize.py OUTDIR
#
# Adjust the #SBATCH lines to your site (partition, account, GPU request, time).
#SBATCH --job-name=wsltool-cohort
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --output=wsltool-cohort-%A_%a.log
##SBATCH --gres=gpu:1
##SBATCH --partition=gpu

set -euo pipefail

if [[ $# -lt 3 ]]; then
    echo "usage: sbatch --array=0-(N-1) $0 COHORT.csv OUTDIR MODEL.pt [wsltool cohort infer options]" >&2
    exit 2
fi
COHORT=$1
OUTDIR=$2
MODEL=$3
shift 3

: "${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=0-(N-1)}"
: "${SLURM_ARRAY_TASK_COUNT:?submit with sbatch --array=0-(N-1)}"
# --array must start at 0 and be contiguous (0-15, not 1-16 nor 0-15:2): task ids are the shard indices.
if [[ -n "${SLURM_ARRAY_TASK_MIN:-}" && "${SLURM_ARRAY_TASK_MIN}" != 0 ]]; then
    echo "submit with --array=0-(N-1): task ids are shard indices" >&2
    exit 2
fi

# Activate the environment holding wsltool, e.g.:
#   source /path/to/venv/bin/activate        or        module load ...; conda activate wsltool
WSLTOOL=${WSLTOOL:-wsltool}

# torch threads: the CPUs Slurm gave this task
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

echo "$(date -Is) task ${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT} on $(hostname)"
exec "$WSLTOOL" cohort infer "$COHORT" -o "$OUTDIR" --model "$MODEL" \
    --shard "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}" \
    --torch-threads "${SLURM_CPUS_PER_TASK:-1}" --quiet "$@"
