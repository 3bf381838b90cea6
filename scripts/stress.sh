#!/usr/bin/env bash
# The long reliability sweep of issue 6 (`make stress`): the interruption
# harness of tests/reliability.rs with many more points (every signal at
# every step line, DEPLOY_STRESS_POINTS moments spread over each run), then
# the concurrency, hostile-rootfs and bad-input suites, then the power-cut
# replay of tests/powercut.rs over every recorded state (issue 11).
#
#   DEPLOY_STRESS_POINTS  moments per scenario (default 60)
#   DEPLOY_STRESS_ROUNDS  how many times to run the sweep (default 1)
#   DEPLOY_STRESS_SEED    jitter seed, to replay a failing round
#   DEPLOY_TINY_ROOTFS    the tiny bootable system (make fixture)
#   POWERCUT_SAMPLE       power-cut states to check (default all)
#   POWERCUT_SEED         seed of the torn points (default 11)
#
# The full log is kept in target/stress-<time>.log; the summary lines
# ("interruption (...): N points tried, N survived", "powercut: N states
# checked, M passed") are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"
export DEPLOY_STRESS_POINTS="${DEPLOY_STRESS_POINTS:-60}"
rounds="${DEPLOY_STRESS_ROUNDS:-1}"
if [ "$(id -u)" != 0 ]; then
  echo "stress: run as root (loop devices, mounts, Btrfs)" >&2
  exit 1
fi
mkdir -p target
log="target/stress-$(date +%Y%m%d-%H%M%S).log"
echo "stress: $rounds round(s), $DEPLOY_STRESS_POINTS points per scenario; log in $log"
cargo build --release --tests >>"$log" 2>&1
status=0
for round in $(seq 1 "$rounds"); do
  echo "stress: round $round/$rounds"
  start=$(date +%s)
  # One test at a time: the measured run durations stay representative.
  if ! cargo test --release --test reliability -- --test-threads=1 --nocapture \
      interrupted >>"$log" 2>&1; then
    status=1
  fi
  grep -E '^(interruption|interruption jitter seed|(New|Upgrade): a full run)' "$log" | tail -n 6 || true
  echo "stress: round $round took $(($(date +%s) - start)) s"
done
echo "stress: concurrency, hostile rootfs, bad input"
for t in "reliability -- --test-threads=1 second_ two_deploys kill_during" "hostile" "bad_input"; do
  # shellcheck disable=SC2086
  if ! cargo test --release --test $t >>"$log" 2>&1; then
    status=1
  fi
done
echo "stress: power-cut replay (${POWERCUT_SAMPLE:-all} states)"
if ! POWERCUT_SAMPLE="${POWERCUT_SAMPLE:-all}" cargo test --release --test powercut -- --nocapture \
    >>"$log" 2>&1; then
  status=1
fi
grep -E '^powercut: [0-9]+ states checked' "$log" | tail -n 1 || true
if [ "$status" != 0 ]; then
  grep -E '^(point |thread .* panicked|test .* FAILED|[0-9]+ of [0-9]+ |powercut: .*FAILED)' "$log" | head -n 40 || true
  echo "stress: FAILED (details in $log)" >&2
  exit 1
fi
echo "stress: all passed (log in $log)"
