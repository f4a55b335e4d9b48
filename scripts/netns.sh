#!/usr/bin/env bash
# Emulated hosts on one machine: network namespaces joined by veths on a bridge, with delay and loss.
#   scripts/netns.sh up [N] [--delay 2ms] [--jitter 0.1ms] [--loss 1%]
#                                        create glmtopo-ns0 … ns{N-1} (default 2) at 10.77.0.1 …, bridge glmtopo-br
#   scripts/netns.sh down                remove them (and stop their delay lines)
#   scripts/netns.sh check               exit 0 when this machine can (root, ip netns), else say why
#   scripts/netns.sh delay NS DEV D [J]  delay what namespace NS sends on DEV by D (± J) without netem (for
#   scripts/netns.sh undelay NS          namespaces made elsewhere, e.g. cmd/glmtopo's emulated-hosts test)
# Delay and loss use tc netem on each namespace's veth. Kernels without sch_netem (CONFIG_NET_SCH_NETEM unset) get:
# - loss from an nftables rule (numgen random: each packet arriving in a namespace is dropped with that probability;
#   on input, not output, since a local output drop is an error the sender sees and re-sends, not a loss on the wire);
# - delay from a delay line: an iptables-legacy rule in each namespace (OUTPUT -o veth -j NFQUEUE --queue-bypass;
#   nft's own queue statement needs CONFIG_NFT_QUEUE) hands every packet leaving the veth to a netdelay process
#   (transport/internal/netdelay, built once with go build into $STATE) running in that namespace, which lets it
#   through D later, in order. When its queue (1024 packets) is full the kernel drops a packet and counts it, as a
#   netem queue over its limit does; down prints each line's counts. A delay line exits on SIGTERM (the rule is
#   removed first; --queue-bypass lets packets pass while no process is bound) and when its namespace is deleted.
# Missing iproute2 / nftables / iptables are installed with apt-get. `up` says which mechanisms it used.
# Run a command on emulated host i: ip netns exec glmtopo-ns$i CMD. The transport tests use it (go test ./transport/tcp -run Netns).
set -euo pipefail
PREFIX=glmtopo-ns
BR=glmtopo-br
STATE=/run/glmtopo-netns # the delay line's binary, and per namespace its pid, log and iptables rule
ROOT=$(cd "$(dirname "$0")/.." && pwd)

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

# netdelay_bin builds the delay line into $STATE (once per up: go build's cache makes a rebuild cheap) and prints
# its path. NETDELAY_BIN names a prebuilt one instead.
netdelay_bin() {
	if [ -n "${NETDELAY_BIN:-}" ]; then echo "$NETDELAY_BIN"; return; fi
	command -v go >/dev/null || { echo "netns: no go toolchain to build the delay line (or set NETDELAY_BIN)" >&2; return 1; }
	mkdir -p "$STATE"
	local tmp
	tmp=$(mktemp "$STATE/netdelay.XXXXXX")
	# A temporary name, then rename: a concurrent up (another test binary) never runs a half-written file.
	(cd "$ROOT" && go build -o "$tmp" ./transport/internal/netdelay/cmd/netdelay) || { rm -f "$tmp"; return 1; }
	mv -f "$tmp" "$STATE/netdelay"
	echo "$STATE/netdelay"
}

# alive PID: the process runs (a zombie does not: an orphan's reaper may take seconds to collect it).
alive() {
	local st
	st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
	[ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# delay_on NS DEV DELAY JITTER QUEUE BIN: start the delay line in NS, wait (≤ 10 s) until it has bound the queue,
# then send DEV's outgoing IPv4 packets to it.
delay_on() {
	local ns=$1 dev=$2 d=$3 j=$4 q=$5 bin=$6
	mkdir -p "$STATE"
	delay_off "$ns" 2>/dev/null || true
	rm -f "$STATE/$ns.ready"
	# No inherited stdout/stderr: a caller reading this script's output (go test's CombinedOutput) would wait
	# for the delay line to exit.
	ip netns exec "$ns" "$bin" -queue "$q" -delay "$d" -jitter "$j" -netns "$ns" -ready "$STATE/$ns.ready" \
		</dev/null >"$STATE/$ns.log" 2>&1 &
	echo $! >"$STATE/$ns.pid"
	local i
	for i in $(seq 100); do
		[ -s "$STATE/$ns.ready" ] && break
		alive "$(cat "$STATE/$ns.pid")" || break
		sleep 0.1
	done
	if [ ! -s "$STATE/$ns.ready" ]; then
		echo "netns: delay line in $ns did not start:" >&2
		cat "$STATE/$ns.log" >&2
		return 1
	fi
	local rule="OUTPUT -o $dev -p all -j NFQUEUE --queue-num $q --queue-bypass"
	ip netns exec "$ns" iptables-legacy -A $rule
	echo "$rule" >"$STATE/$ns.rule"
}

# delay_off NS: remove NS's NFQUEUE rule, then SIGTERM its delay line (which lets waiting packets go) and wait for
# it (≤ 3 s, then SIGKILL). Prints the line's counts.
delay_off() {
	local ns=$1 pid rule
	if [ -f "$STATE/$ns.rule" ]; then
		rule=$(cat "$STATE/$ns.rule")
		ip netns exec "$ns" iptables-legacy -D $rule 2>/dev/null || true
		rm -f "$STATE/$ns.rule"
	fi
	[ -f "$STATE/$ns.pid" ] || return 0
	pid=$(cat "$STATE/$ns.pid")
	# Only our own process: the pid may have been reused since.
	if tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q "netdelay .*-netns $ns "; then
		kill -TERM "$pid" 2>/dev/null || true
		local i
		for i in $(seq 30); do
			alive "$pid" || break
			sleep 0.1
		done
		alive "$pid" && kill -KILL "$pid" 2>/dev/null
	fi
	grep -ho 'msg="netdelay: done".*' "$STATE/$ns.log" 2>/dev/null | sed "s/^msg=\"netdelay: done\"/netns: delay line $ns:/" >&2 || true
	rm -f "$STATE/$ns.pid" "$STATE/$ns.ready" "$STATE/$ns.log"
}

down() {
	local f
	for f in "$STATE/${PREFIX}"[0-9]*.pid; do
		[ -e "$f" ] && delay_off "$(basename "$f" .pid)"
	done
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
	local n=2 delay="" jitter=0 loss=""
	while [ $# -gt 0 ]; do
		case "$1" in
		--delay) delay=$2; shift 2 ;;
		--jitter) jitter=$2; shift 2 ;;
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
	local bin="" how=""
	if [ "$netem" = 1 ]; then
		how="tc netem"
	else
		[ -n "$loss" ] && how="loss: nftables numgen drop on input"
		if [ -n "$delay" ]; then
			need iptables-legacy iptables || { echo "netns: no netem and no iptables-legacy: cannot emulate delay" >&2; exit 1; }
			bin=$(netdelay_bin) || { echo "netns: cannot build the delay line" >&2; exit 1; }
			how="${how:+$how; }delay: NFQUEUE delay line (iptables-legacy OUTPUT -j NFQUEUE + netdelay per namespace)"
		fi
	fi
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
			local nj=""
			[ "$jitter" != 0 ] && nj=$jitter
			ip netns exec "$ns" tc qdisc add dev "$host" root netem ${delay:+delay $delay $nj} ${loss:+loss $loss}
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
		if [ "$netem" = 0 ] && [ -n "$delay" ]; then
			delay_on "$ns" "$host" "$delay" "$jitter" "$i" "$bin" || exit 1
		fi
	done
	echo "netns: $n namespaces ${PREFIX}0…$((n - 1)) at 10.77.0.1…$n on $BR${delay:+ delay $delay}$([ "$jitter" != 0 ] && echo " ± $jitter")${loss:+ loss $loss}${how:+ ($how)}"
}

case "${1:-}" in
up) shift; up "$@" ;;
down) down ;;
check) check ;;
delay)
	[ $# -ge 4 ] || { echo "usage: $0 delay NS DEV DELAY [JITTER]" >&2; exit 2; }
	check
	need iptables-legacy iptables || { echo "netns: no iptables-legacy: cannot emulate delay" >&2; exit 1; }
	bin=$(netdelay_bin)
	delay_on "$2" "$3" "$4" "${5:-0}" 0 "$bin"
	echo "netns: $2: $3 delayed by $4 (NFQUEUE delay line)"
	;;
undelay)
	[ $# -ge 2 ] || { echo "usage: $0 undelay NS" >&2; exit 2; }
	delay_off "$2"
	;;
*) echo "usage: $0 up [N] [--delay D] [--jitter J] [--loss P%] | down | check | delay NS DEV D [J] | undelay NS" >&2; exit 2 ;;
esac
