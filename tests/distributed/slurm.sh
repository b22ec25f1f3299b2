#!/usr/bin/env bash
# Distributed conversion on a real Slurm cluster: brings up a one-node cluster (Debian's
# slurm-wlm and munge; slurmctld + slurmd on this host, everything under a temp dir, on
# free ports, beside any Slurm or munge already running), then checks
#
#  1. the documented workflow: deploy/slurm/cersa-convert.sbatch as a 4-task array
#     (`--part auto` from Slurm's array variables), cersa-assemble.sbatch after it with
#     --dependency=afterok, gives the bytes of a one-machine `cersa convert --threads 1`
#     (every file, same file list);
#  2. a failed task: one task is cancelled (scancel) after it closed a shard; the other
#     three parts complete, assembling the incomplete set fails and writes nothing, a
#     rerun of that task alone without CERSA_PARTS is refused, with it
#     (`CERSA_PARTS=4 sbatch --array=1`) it resumes from the journaled shards (the same
#     files end up in the part) and leaves the other parts untouched, resubmitting the
#     whole array is a no-op, and the assembly is again byte-identical to the one-machine
#     output.
#
# Usage (as root: it installs the packages if missing and runs the daemons):
#   tests/distributed/slurm.sh [CERSA_BIN]      # default target/release/cersa
# Needs python3 with numpy and safetensors (tests/python/requirements.txt). About a minute.
# Every daemon and job it started is stopped on exit, and its temp dir removed;
# CERSA_SLURM_KEEP=1 keeps the temp dir for a look.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=$(realpath -e "${1:-$ROOT/target/release/cersa}")
CONVERT_SBATCH="$ROOT/deploy/slurm/cersa-convert.sbatch"
ASSEMBLE_SBATCH="$ROOT/deploy/slurm/cersa-assemble.sbatch"
T0=$SECONDS

say() { echo "[slurm.sh +$((SECONDS - T0))s] $*"; }
fail() {
    echo "FAIL: $*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || fail "run as root (it installs slurm-wlm/munge and runs their daemons)"
[ -x "$BIN" ] || fail "$BIN is not an executable"
python3 -c 'import numpy, safetensors' 2>/dev/null ||
    fail "python3 needs numpy and safetensors: pip install -r tests/python/requirements.txt"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cersa-slurm.XXXXXX")
# munged refuses a socket whose directories are not searchable by everyone.
chmod 755 "$WORK"
mkdir -m 700 "$WORK/munge"
mkdir -m 755 "$WORK/run"
mkdir "$WORK/etc" "$WORK/state" "$WORK/spool" "$WORK/log" "$WORK/jobs"
export SLURM_CONF="$WORK/etc/slurm.conf"
DAEMONS=() # pids, in start order
SLURM_UP=
sbatch_pid= # a `sbatch --wait` in the background

print_logs() {
    local f
    for f in "$WORK"/log/* "$WORK"/jobs/*; do
        [ -f "$f" ] || continue
        echo "----- ${f#"$WORK"/} (last 40 lines)"
        tail -n 40 "$f"
    done
}

cleanup() {
    local rc=$? i pid
    set +e
    trap - EXIT INT TERM
    [ -n "$sbatch_pid" ] && kill "$sbatch_pid" 2>/dev/null
    if [ -n "$SLURM_UP" ]; then
        # Jobs first: their processes belong to slurmstepd, not to the daemons below.
        scancel --user="$(id -un)" 2>/dev/null
        for _ in $(seq 1 30); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    [ "$rc" = 0 ] || print_logs
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        pid=${DAEMONS[i]}
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [ "${CERSA_SLURM_KEEP:-0}" = 1 ]; then
        echo "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    [ "$rc" = 0 ] && say "passed" || echo "slurm.sh failed (exit $rc)" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- the cluster ---------------------------------------------------------------------------
say "starting munged and a one-node Slurm cluster in $WORK"
mungekey --create --keyfile="$WORK/munge/munge.key" >/dev/null 2>&1 ||
    dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$WORK/munge/munge.key"
munged --foreground --key-file="$WORK/munge/munge.key" --socket="$WORK/run/munge.sock" \
    --pid-file="$WORK/run/munged.pid" --seed-file="$WORK/munge/seed" \
    --log-file="$WORK/log/munged.log" >>"$WORK/log/munged.stderr" 2>&1 &
DAEMONS+=($!)
for _ in $(seq 1 50); do
    [ -S "$WORK/run/munge.sock" ] && break
    sleep 0.1
done
munge -n --socket="$WORK/run/munge.sock" | unmunge --socket="$WORK/run/munge.sock" >/dev/null ||
    fail "munged does not answer on $WORK/run/munge.sock"

# Two free TCP ports, so that a Slurm already running here is left alone.
read -r CTLD_PORT SLURMD_PORT < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')
# This host's real CPUs, sockets, cores and memory, as slurmd itself sees them (a node
# configured above what slurmd finds is drained), under the name slurmd will look for.
NODE=$(slurmd -C | head -n 1)
HOST=$(sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' <<<"$NODE")
CPUS=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$NODE")
MEM=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$NODE")
[ -n "$HOST" ] || fail "no NodeName in slurmd -C: $NODE"
[ -n "$CPUS" ] || fail "no CPUs in slurmd -C: $NODE"
[ -n "$MEM" ] || fail "no RealMemory in slurmd -C: $NODE"
# proctrack/linuxproc and task/none: no cgroups, which containers often cannot delegate.
# MinJobAge=4 makes `sbatch --wait` poll every 2 s (it polls at 2, 8, 32 s... when finished
# jobs are kept longer); so finished tasks are forgotten after ~4 s, and --wait's exit
# status can miss a task that failed long before the others: this test checks the parts
# on disk, not that status. DefMemPerCPU splits the memory, so tasks run side by side.
cat >"$SLURM_CONF" <<EOF
ClusterName=cersatest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$WORK/run/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/run/slurmctld.pid
SlurmdPidFile=$WORK/run/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((MEM / CPUS))
ReturnToService=2
MinJobAge=4
KillWait=5
MailProg=/bin/true
$NODE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=test Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -D -f "$SLURM_CONF" >>"$WORK/log/slurmctld.stderr" 2>&1 &
DAEMONS+=($!)
slurmd -D -f "$SLURM_CONF" >>"$WORK/log/slurmd.stderr" 2>&1 &
DAEMONS+=($!)
SLURM_UP=1
state=
for _ in $(seq 1 60); do
    state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.5
done
[ "$state" = idle ] || fail "node $HOST is not idle after 30 s (sinfo: '${state:-no answer}')"
say "cluster up: node $HOST idle, $CPUS CPUs, ${MEM} MB (ports $CTLD_PORT, $SLURMD_PORT)"

# ---- the source and the one-machine reference ------------------------------------------------
# A checkpoint of 4 layers: 16 attention matrices 2048×2048 in f16 and 4 f32 MLP matrices
# 1024×2048, each of low rank plus noise, norms, an f16 embedding that stays dense (176 MB).
# A part takes seconds (~0.9 s a 2048² matrix on one core here), so a task can be
# cancelled in the middle; shards of 256 kB hold about one tensor's factors, so a part
# writes several and an interrupted one has journaled shards to resume from.
export SRC="$WORK/src/model.safetensors"
mkdir "$WORK/src"
python3 - "$SRC" <<'EOF'
import sys
import numpy as np
from safetensors.numpy import save_file

rng = np.random.default_rng(18)
def low_rank(m, n, r):
    a = rng.standard_normal((m, r), dtype=np.float32)
    b = rng.standard_normal((r, n), dtype=np.float32)
    noise = rng.standard_normal((m, n), dtype=np.float32)
    return a @ b / np.float32(np.sqrt(r)) + np.float32(0.1) * noise

d = 2048
t = {"model.embed_tokens.weight": rng.standard_normal((2048, d), dtype=np.float32).astype(np.float16)}
for i in range(4):
    p = f"model.layers.{i}."
    for j, name in enumerate(["q_proj", "k_proj", "v_proj", "o_proj"]):
        t[f"{p}self_attn.{name}.weight"] = low_rank(d, d, 24 + 8 * ((i + j) % 5)).astype(np.float16)
    t[p + "mlp.up_proj.weight"] = low_rank(d // 2, d, 40)
    t[p + "input_layernorm.weight"] = np.ones(d, dtype=np.float32)
t["model.norm.weight"] = np.ones(d, dtype=np.float32)
save_file(t, sys.argv[1])
EOF
export CERSA_OPTS="--max-shard-size 256kB --quiet"
say "one-machine reference: cersa convert --threads 1 $CERSA_OPTS"
read -r -a opts <<<"$CERSA_OPTS"
"$BIN" convert "$SRC" "$WORK/one" --threads 1 "${opts[@]}" >"$WORK/log/one.out" ||
    fail "one-machine convert failed (exit $?)"
say "one-machine reference done ($(find "$WORK/one" -type f | wc -l) files)"

# The tree as text: every entry with its type, every file with its sha256.
digest() {
    (cd "$1" && find . -mindepth 1 -printf '%y %p\n' | LC_ALL=C sort &&
        find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum)
}
same_as_one() {
    if ! diff <(digest "$WORK/one") <(digest "$1") >"$WORK/log/diff.txt"; then
        cat "$WORK/log/diff.txt" >&2
        fail "$1 differs from the one-machine output (< one, > assembled)"
    fi
    diff -r "$WORK/one" "$1" >/dev/null || fail "diff -r: $1 differs from the one-machine output"
}
complete_parts() {
    local d n=0
    for d in "$1"/part-*; do [ -f "$d/cersa-part.json" ] && n=$((n + 1)); done
    echo "$n"
}
journaled_shards() { # closed shards in a partial directory's journal (the first line is its header)
    local j="$1/journal.jsonl"
    [ -f "$j" ] || {
        echo 0
        return
    }
    echo $(($(wc -l <"$j") - 1))
}

export CERSA_BIN="$BIN"
SB=(sbatch --chdir="$WORK")

# ---- 1. the documented workflow ---------------------------------------------------------------
say "1. array 0-3 of cersa-convert.sbatch, then cersa-assemble.sbatch with afterok"
export PARTS="$WORK/parts-a" OUT="$WORK/out-a"
jid=$("${SB[@]}" --parsable --array=0-3 --output="$WORK/jobs/a-convert-%a.out" "$CONVERT_SBATCH")
jid=${jid%%;*}
"${SB[@]}" --wait --dependency=afterok:"$jid" --output="$WORK/jobs/a-assemble.out" "$ASSEMBLE_SBATCH" >/dev/null ||
    fail "the assemble job after array $jid failed (exit $?)"
n=$(complete_parts "$PARTS")
[ "$n" = 4 ] || fail "$n of 4 parts complete in $PARTS"
grep -q -- "--part auto" "$WORK/jobs/a-convert-2.out" || fail "task 2 did not run --part auto"
same_as_one "$OUT"
say "1. passed: 4 parts assembled, byte-identical to the one-machine output"

# ---- 2. a failed task, rerun alone --------------------------------------------------------------
# Task K is cancelled while it runs, once its journal lists a closed shard. It is not
# flaky: a part takes seconds (~5 matrices of up to ~0.9 s on one core, ~1 shard each)
# and the cancel follows within ~0.1 s of the first closed shard (polled every 50 ms), so
# the task is always mid-way; the checks below fail loudly (not silently pass) if it ever
# finished first. scancel sends SIGTERM, on which cersa stops after the tensors in
# progress (exit 2), as on a time limit (Slurm sends SIGKILL after KillWait, like a node
# lost): what must survive is the journal.
K=1
say "2. array 0-3 again, task $K cancelled after its first closed shard"
export PARTS="$WORK/parts-b" OUT="$WORK/out-b"
partial="$PARTS/.part-$K.cersa-partial"
"${SB[@]}" --wait --array=0-3 --job-name=b-convert --output="$WORK/jobs/b-convert-%a.out" \
    "$CONVERT_SBATCH" >"$WORK/log/b-sbatch.out" 2>&1 &
sbatch_pid=$!
jid=
for _ in $(seq 1 1200); do
    # (sbatch's own stdout is a file here, flushed only at its exit.)
    [ -z "$jid" ] && jid=$(squeue -h --name=b-convert -o %F 2>/dev/null | head -n 1)
    [ -n "$jid" ] && [ "$(journaled_shards "$partial")" -ge 1 ] && break
    [ -e "$PARTS/part-$K" ] && break
    kill -0 "$sbatch_pid" 2>/dev/null || break
    sleep 0.05
done
[ -n "$jid" ] || fail "no job id from sbatch: $(cat "$WORK/log/b-sbatch.out")"
[ ! -e "$PARTS/part-$K" ] || fail "task $K finished before it could be cancelled: a bigger source is needed"
[ "$(journaled_shards "$partial")" -ge 1 ] || fail "task $K never journaled a shard in $partial"
scancel "${jid}_$K"
# The documented follow-up job: it must never run (Slurm cancels it, --kill-on-invalid-dep).
ajid=$("${SB[@]}" --parsable --dependency=afterok:"$jid" --output="$WORK/jobs/b-assemble.out" "$ASSEMBLE_SBATCH")
sbatch_rc=0
wait "$sbatch_pid" || sbatch_rc=$?
sbatch_pid=
# (sbatch --wait's status is not checked: see MinJobAge above.)
for _ in $(seq 1 60); do
    [ -z "$(squeue -h -j "$ajid" -o %i 2>/dev/null)" ] && break
    sleep 0.5
done
[ -z "$(squeue -h -j "$ajid" -o %i 2>/dev/null)" ] ||
    fail "the assemble job $ajid is still queued after its dependency failed: $(squeue -j "$ajid" 2>&1)"
[ ! -e "$WORK/jobs/b-assemble.out" ] || fail "the assemble job ran after a failed task"
[ ! -e "$OUT" ] || fail "$OUT was written after a failed task"
[ ! -e "$PARTS/part-$K" ] || fail "task $K completed although it was cancelled"
kept=$(journaled_shards "$partial")
[ "$kept" -ge 1 ] || fail "the cancelled task's journal lost its shards"
n=$(complete_parts "$PARTS")
[ "$n" = 3 ] || fail "$n parts complete, expected the 3 not cancelled"
say "2. task $K cancelled (sbatch --wait exit $sbatch_rc): 3 parts complete, $kept shards journaled in $partial; the afterok assemble job was cancelled, not run"

# Assembling without part K must fail and write nothing.
if "$BIN" assemble "$OUT" "$PARTS"/part-* >"$WORK/log/b-early.out" 2>"$WORK/log/b-early.err"; then
    fail "assemble succeeded with part $K missing"
fi
[ ! -e "$OUT" ] || fail "a failed assemble left $OUT"
say "2. assembling 3 of 4 parts fails as it should: $(tail -n 1 "$WORK/log/b-early.err")"

others() { for d in "$PARTS"/part-*; do [ "$d" = "$PARTS/part-$K" ] || digest "$d"; done; }
before=$(others)
# The journaled shard files, by inode: a resume that keeps them (rather than recomputing
# them) moves the same files into the part.
kept_inodes=$(python3 - "$partial" <<'EOF'
import json, os, sys
lines = open(os.path.join(sys.argv[1], "journal.jsonl")).read().splitlines()[1:]
for line in lines:
    try:
        rec = json.loads(line)
    except ValueError:
        continue  # a torn last line
    print(os.stat(os.path.join(sys.argv[1], rec["file"])).st_ino)
EOF
)

# Alone, task K is an array of one: without CERSA_PARTS the script must refuse it rather
# than let `--part auto` convert part 0 of 1.
"${SB[@]}" --wait --array="$K" --output="$WORK/jobs/b-bare-%a.out" "$CONVERT_SBATCH" >/dev/null 2>&1 || true
grep -q "rerun some with CERSA_PARTS=N" "$WORK/jobs/b-bare-$K.out" ||
    fail "a rerun of task $K without CERSA_PARTS was not refused"
[ ! -e "$PARTS/part-$K" ] || fail "the refused rerun wrote part $K"
[ "$(journaled_shards "$partial")" = "$kept" ] || fail "the refused rerun changed $partial"
[ "$(others)" = "$before" ] || fail "the refused rerun changed the other parts"

say "2. rerunning task $K alone: CERSA_PARTS=4 sbatch --array=$K --wait"
CERSA_PARTS=4 "${SB[@]}" --wait --array="$K" --output="$WORK/jobs/b-rerun-%a.out" "$CONVERT_SBATCH" >/dev/null ||
    fail "the rerun of task $K failed (exit $?)"
[ -f "$PARTS/part-$K/cersa-part.json" ] || fail "the rerun did not complete part $K"
[ ! -e "$partial" ] || fail "$partial is still there after the rerun completed"
[ "$(others)" = "$before" ] || fail "rerunning task $K changed the other parts"
part_inodes=$(find "$PARTS/part-$K" -type f -printf '%i\n')
for ino in $kept_inodes; do
    grep -qx "$ino" <<<"$part_inodes" || fail "journaled shard (inode $ino) was not kept by --resume"
done
say "2. rerun resumed: the $kept journaled shards are files of part-$K, the other parts unchanged"

# A requeue or a second submission of the whole array does nothing.
all=$(for d in "$PARTS"/part-*; do digest "$d"; done)
"${SB[@]}" --wait --array=0-3 --output="$WORK/jobs/b-again-%a.out" "$CONVERT_SBATCH" >/dev/null ||
    fail "resubmitting the complete array failed (exit $?)"
[ "$(for d in "$PARTS"/part-*; do digest "$d"; done)" = "$all" ] || fail "resubmitting changed the parts"
for k in 0 1 2 3; do
    grep -q "complete already" "$WORK/jobs/b-again-$k.out" || fail "task $k of the resubmission did work"
done

"$BIN" assemble "$OUT" "$PARTS"/part-* >"$WORK/log/b-assemble.out" || fail "assemble failed (exit $?)"
same_as_one "$OUT"
say "2. passed: after the rerun, the assembly is byte-identical to the one-machine output"
