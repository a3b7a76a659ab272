#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ (cargo-fuzz, libFuzzer) for SECONDS each
# (default 60), one after the other, and prints for each the executions it
# ran and whether it found a crash. Exits non-zero if any target crashed
# (or failed to build or run).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     e.g. scripts/fuzz.sh 600 virtio_queues
#
# Environment: FUZZ_RSS_MB (libFuzzer's -rss_limit_mb, default 2048),
# FUZZ_ARGS (more libFuzzer flags).
#
# Why RUSTC_BOOTSTRAP=1: cargo-fuzz builds the targets with nightly-only
# rustc flags (-Zsanitizer=address, -Cpasses=sancov-module and the
# -Zsanitizer-coverage-* options that feed libFuzzer its coverage). Only
# stable Rust is installed here; RUSTC_BOOTSTRAP=1 lets the stable compiler
# accept those flags. It is set for these builds only, never for the
# project's own build.
#
# The fuzz crate is not a member of the main workspace (fuzz/Cargo.toml has
# its own [workspace]); it builds into fuzz/target. Corpora grow under
# fuzz/corpus/TARGET (not in git), starting from the seeds in
# fuzz/seeds/TARGET (in git); a crash is saved under fuzz/artifacts/TARGET
# and its path printed: reproduce it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -a TARGET fuzz/artifacts/TARGET/crash-...
# (from fuzz/ or with --fuzz-dir fuzz), and minimize it with `cargo fuzz tmin`.
set -uo pipefail

seconds=${1:-60}
shift || true
root=$(cd "$(dirname "$0")/.." && pwd)
fuzz="$root/fuzz"
all_targets=(log_reader channel_frames ftdisk_requests snapshot_reader virtio_queues platform_devices resp_parser)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all_targets[@]}")
rss=${FUZZ_RSS_MB:-2048}

case "$seconds" in
'' | *[!0-9]*)
	echo "usage: $0 [SECONDS] [TARGET...]" >&2
	exit 2
	;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
	echo "== installing cargo-fuzz" >&2
	cargo install cargo-fuzz --locked || {
		echo "cannot install cargo-fuzz" >&2
		exit 1
	}
fi

export RUSTC_BOOTSTRAP=1
cd "$fuzz" || exit 1
# -a: debug assertions (and with them overflow checks) in the code under
# test, so an arithmetic overflow is a crash rather than a silent wrap.
build_flags=(-a)

echo "== building the fuzz targets" >&2
: >"$fuzz/build.log"
for target in "${targets[@]}"; do
	if ! cargo fuzz build "${build_flags[@]}" "$target" >>"$fuzz/build.log" 2>&1; then
		built=no
		break
	fi
done
if [ "${built:-yes}" = no ]; then
	tail -30 "$fuzz/build.log" >&2
	echo "building the fuzz targets failed (full log: fuzz/build.log)" >&2
	exit 1
fi

status=0
summary=()
for target in "${targets[@]}"; do
	corpus="$fuzz/corpus/$target"
	seeds="$fuzz/seeds/$target"
	mkdir -p "$corpus" "$fuzz/artifacts/$target"
	log="$fuzz/artifacts/$target/last-run.log"
	dirs=("$corpus")
	[ -d "$seeds" ] && dirs+=("$seeds")
	echo "== $target: $seconds s" >&2
	# -timeout: an input that runs for 10 s is a hang, reported as a crash.
	cargo fuzz run "${build_flags[@]}" "$target" "${dirs[@]}" -- \
		-max_total_time="$seconds" -rss_limit_mb="$rss" -timeout=10 \
		-print_final_stats=1 ${FUZZ_ARGS:-} >"$log" 2>&1
	rc=$?
	# The executions: libFuzzer's final statistics, or its "#N DONE" line,
	# or (after a crash) the last "#N" status line.
	execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
	[ -z "$execs" ] && execs=$(grep -oE '^#[0-9]+[[:space:]]+DONE' "$log" | grep -oE '[0-9]+' | tail -1)
	[ -z "$execs" ] && execs=$(grep -oE '^#[0-9]+' "$log" | tr -d '#' | tail -1)
	execs=${execs:-?}
	crash=$(grep -oE "(Test unit written to|artifact_prefix.*; Test unit written to) [^ ]+" "$log" | awk '{print $NF}' | head -1)
	if [ "$rc" -ne 0 ] || [ -n "$crash" ]; then
		status=1
		why=$(grep -m1 -E "panicked at|ERROR: (AddressSanitizer|libFuzzer)|SUMMARY:" "$log")
		summary+=("$(printf '%-16s %12s execs  CRASH  %s %s' "$target" "$execs" "${crash:-(no artifact; see $log)}" "$why")")
	else
		summary+=("$(printf '%-16s %12s execs  ok' "$target" "$execs")")
	fi
done

echo
echo "fuzzing, $seconds s per target:"
printf '  %s\n' "${summary[@]}"
exit $status
