#!/usr/bin/env bash
# Run a device-machine job longer than one call's 10 minutes: the job runs in its own process session (which the
# device tool leaves running after a call returns, until the machine goes back: 30 s idle, 30 min held), and each
# call waits for it a while and brings back what it has written so far.
#   bash bench/gpu_detached.sh start CMD [ARG ...]   start CMD in a copy of the tree (its $OUT is $J/out), then wait
#   bash bench/gpu_detached.sh wait                  wait up to WAIT_S (default 560) for the job to end
# Every call copies the job's files so far (more than MAX_FILES, default 6: all of them as out.tgz, since at most 8
# files come back from a call) and its log into this call's $OUT and prints the log's tail; when the job has ended,
# $OUT/rc holds its exit status. Issue the next `wait` at once: an idle machine goes back after 30 s.
# The job runs in a copy of the tree as it was at `start` ($J/tree, .git left out): each device call re-syncs the
# working tree and removes the ignored paths it does not carry, which once took .client/.tok from under a running
# bench_serving (2026-12-02); a `wait` call needs no carry.
# A second job on the same machine (DETACHED_DIR=/tmp/detached2, its own $OUT subfolder) shares the GPU: SGLang sizes
# its pools from the memory free when it starts, so two jobs' --mem-fraction-static must leave each other room (the
# soak's server, 0.4, did not start beside the quality suite's Engine, 0.6, on 2026-12-02), and timings taken while
# the other job runs are not measurements. Each answer's next `wait` must come within the 30 s idle release.
set -uo pipefail
J="${DETACHED_DIR:-/tmp/detached}"
case "${1:-}" in
  start)
    shift
    [ $# -gt 0 ] || { echo "usage: $0 start CMD [ARG ...]" >&2; exit 2; }
    [ ! -e "$J/pid" ] || { echo "a job was already started on this machine ($J)" >&2; exit 2; }
    mkdir -p "$J/out" "$J/tree"
    tar --exclude=./.git -cf - . | tar -xf - -C "$J/tree"
    cd "$J/tree" || exit 2
    OUT="$J/out" setsid bash -c '"$@" > '"$J"'/log 2>&1; echo $? > '"$J"'/rc' job "$@" < /dev/null &
    echo $! > "$J/pid" ;;
  wait) [ -e "$J/pid" ] || { echo "no job was started on this machine (it was given back?)" >&2; exit 2; } ;;
  *) echo "usage: $0 start CMD [ARG ...] | wait" >&2; exit 2 ;;
esac
end=$(( $(date +%s) + ${WAIT_S:-560} ))
while [ ! -e "$J/rc" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
# At most 8 files come back from a device call: a job that wrote more than MAX_FILES comes back as out.tgz
if [ "$(find "$J/out" -type f | wc -l)" -gt "${MAX_FILES:-6}" ]; then tar czf "${OUT:?}/out.tgz" -C "$J/out" .
else cp -r "$J/out/." "${OUT:?}/" 2>/dev/null; fi
cp "$J/log" "$OUT/job.log"
tail -40 "$J/log"
if [ -e "$J/rc" ]; then cp "$J/rc" "$OUT/rc"; echo "[detached] job ended, rc $(cat "$J/rc")"
else echo "[detached] job still running after $(( $(ps -o etimes= -p "$(cat "$J/pid")" 2>/dev/null || echo 0) ))s"; fi
