#!/usr/bin/env bash
# Emulated hosts on one machine: network namespaces joined by veths on a bridge, with delay and loss.
#   scripts/netns.sh up [N] [--delay 2ms] [--loss 1%]   create glmtopo-ns0 … ns{N-1} (default 2) at 10.77.0.1 …, bridge glmtopo-br
#   scripts/netns.sh down                               remove them
#   scripts/netns.sh check                              exit 0 when this machine can (root, ip netns), else say why
# Delay and loss use tc netem on each namespace's veth. Kernels without sch_netem (CONFIG_NET_SCH_NETEM unset) get the
# loss from an nftables rule instead (numgen random: each packet arriving in a namespace is dropped with that probability;
# on input, not output, since a local output drop is an error the sender sees and re-sends, not a loss on the wire)
# and no delay (said on stderr). Missing iproute2 / nftables are installed with apt-get.
# Run a command on emulated host i: ip netns exec glmtopo-ns$i CMD. The transport tests use it (go test ./transport/tcp -run Netns).
set -euo pipefail
PREFIX=glmtopo-ns
BR=glmtopo-br

need() { # need CMD PACKAGE
	command -v "$1" >/dev/null && return 0
	if command -v apt-get >/dev/null; then
		echo "netns: installing $2" >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1; }
	fi
	command -v "$1" >/dev/null
}

check() {
	[ "$(id -u)" = 0 ] || { echo "netns: needs root" >&2; return 1; }
	need ip iproute2 || { echo "netns: no ip (iproute2)" >&2; return 1; }
	ip netns add "${PREFIX}-probe" 2>/dev/null || { echo "netns: ip netns add failed (no CAP_SYS_ADMIN or no netns support)" >&2; return 1; }
	ip netns del "${PREFIX}-probe"
}

netem_ok() {
	ip link add glmtopo-p0 type veth peer name glmtopo-p1 2>/dev/null || return 1
	local ok=1
	tc qdisc add dev glmtopo-p0 root netem delay 1ms 2>/dev/null && ok=0
	ip link del glmtopo-p0 2>/dev/null || true
	return $ok
}

down() {
	# Delete the root-side veths first (that removes both ends at once; a
	# namespace's own links go away asynchronously after ip netns del).
	for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep '^glmtopo-b[0-9]' || true); do
		ip link del "$l" 2>/dev/null || true
	done
	for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${PREFIX}[0-9]" || true); do
		ip netns del "$ns" || true
	done
	ip link del "$BR" 2>/dev/null || true
	for _ in $(seq 50); do # wait (≤ 5 s) until the kernel has let go of the names
		ip -o link show 2>/dev/null | grep -q 'glmtopo-[bh][0-9]' || return 0
		sleep 0.1
	done
}

up() {
	local n=2 delay="" loss=""
	while [ $# -gt 0 ]; do
		case "$1" in
		--delay) delay=$2; shift 2 ;;
		--loss) loss=$2; shift 2 ;;
		[0-9]*) n=$1; shift ;;
		*) echo "netns up: unknown argument $1" >&2; exit 2 ;;
		esac
	done
	check
	down
	ip link add "$BR" type bridge
	ip link set "$BR" up
	local netem=0
	if [ -n "$delay$loss" ] && need tc iproute2 && netem_ok; then netem=1; fi
	if [ -n "$loss" ] && [ "$netem" = 0 ]; then
		need nft nftables || { echo "netns: no netem and no nft: cannot emulate loss" >&2; exit 1; }
	fi
	[ -n "$delay" ] && [ "$netem" = 0 ] && echo "netns: this kernel has no sch_netem: no delay emulated (loss via nftables)" >&2
	for i in $(seq 0 $((n - 1))); do
		local ns=$PREFIX$i host=glmtopo-h$i peer=glmtopo-b$i
		ip netns add "$ns"
		ip link add "$host" type veth peer name "$peer"
		ip link set "$host" netns "$ns"
		ip link set "$peer" master "$BR" up
		ip -n "$ns" addr add "10.77.0.$((i + 1))/24" dev "$host"
		ip -n "$ns" link set "$host" up
		ip -n "$ns" link set lo up
		if [ "$netem" = 1 ]; then
			ip netns exec "$ns" tc qdisc add dev "$host" root netem ${delay:+delay $delay} ${loss:+loss $loss}
		elif [ -n "$loss" ]; then
			local pct=${loss%\%}
			# numgen gives 0…9999; drop below pct×100 (1% → 100).
			local thr
			thr=$(awk -v p="$pct" 'BEGIN{printf "%d", p*100}')
			ip netns exec "$ns" nft -f - <<NFT
table inet glmtopo {
	chain in {
		type filter hook input priority 0; policy accept;
		numgen random mod 10000 < $thr drop
	}
}
NFT
		fi
	done
	echo "netns: $n namespaces ${PREFIX}0…$((n - 1)) at 10.77.0.1…$n on $BR${delay:+ delay $delay}${loss:+ loss $loss} ($([ "$netem" = 1 ] && echo netem || echo nftables))"
}

case "${1:-}" in
up) shift; up "$@" ;;
down) down ;;
check) check ;;
*) echo "usage: $0 up [N] [--delay D] [--loss P%] | down | check" >&2; exit 2 ;;
esac
