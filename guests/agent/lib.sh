# Shared helpers of the guest agent (busybox sh).  Installed as /usr/lib/harness/lib.sh
# and sourced by /init, /usr/bin/agent and the boot hooks.

EFIVARS=/sys/firmware/efi/efivars
GLOBAL_GUID=8be4df61-93ca-11d2-aa0d-00e098032b8c
AGENT_RUN=/run/agent
FW_CFG_CONFIG=/sys/firmware/qemu_fw_cfg/by_name/opt/harness/config/raw

# A JSON string literal of $1 (backslash, quote and control characters escaped).  Text
# that needs no escaping is printed without the pipeline's processes (a status after a
# hop runs in a guest with nothing translated yet: each fork costs TCG thousands of blocks).
jstr() {
	case $1 in
	*[!A-Za-z0-9._:/@+,=\ -]*)
		printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/\t/\\t/g' | tr -d '\000-\037')" ;;
	*) printf '"%s"' "$1" ;;
	esac
}

# Print {"error": MSG} on stdout and exit with status ${2:-1}.
fail() {
	printf '{"error": %s}\n' "$(jstr "$1")"
	exit "${2:-1}"
}

# Kernel release the image was built for.
kver() {
	cat /etc/harness/kver
}

# Load module $1 (with parameters $2...) after its dependencies; a no-op when loaded.
modload() {
	local _m _line _d
	_m=$1
	shift
	[ -d "/sys/module/$_m" ] && return 0
	_line=$(grep "^$_m:" "/lib/modules/$(kver)/deps") || {
		echo "modload: no module $_m in this image" >&2
		return 1
	}
	for _d in ${_line#*:}; do
		modload "$_d" || return 1
	done
	insmod "/lib/modules/$(kver)/$_m.ko" "$@"
}

# Value of config key $1 from the merged config (/run/agent/config), or $2.
cfg() {
	_v=$(sed -n "s/^$1=//p" "$AGENT_RUN/config" 2>/dev/null | tail -n 1)
	if [ -n "$_v" ]; then printf '%s' "$_v"; else printf '%s' "$2"; fi
}

# Guest uptime in seconds (float text) from /proc/uptime.
uptime_s() {
	read -r _up _idle </proc/uptime
	printf '%s' "$_up"
}

# Lower-case hex of file $1's bytes (no separators).
hexof() {
	od -An -v -tx1 "$1" | tr -d ' \n'
}

# Write the bytes spelled by hex string $1 to stdout.
unhex() {
	# shellcheck disable=SC2059
	printf "$(printf '%s' "$1" | sed 's/../\\x&/g')"
}

# True when $1 is an even-length hex string (empty allowed).
is_hex() {
	case $1 in *[!0-9a-fA-F]*) return 1 ;; esac
	[ $((${#1} % 2)) -eq 0 ]
}
