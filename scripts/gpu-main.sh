# Sourced at the end of the GPU scripts that define build and run:
#   gpu_main SCRIPT CARRY [ARG]
# ARG build or run calls that step; none (all) builds, then runs where a GPU
# is, else says what to copy (CARRY) to a GPU host.
gpu_main() {
	local script=$1 carry=$2
	case "${3:-all}" in
	build) build ;;
	run) run ;;
	all)
		build || return 1
		if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
			run
		else
			echo "no GPU here: copy the repository (with $carry) to a GPU host and run: scripts/$script run"
		fi
		;;
	*) echo "usage: scripts/$script [build|run]" >&2; return 2 ;;
	esac
}
