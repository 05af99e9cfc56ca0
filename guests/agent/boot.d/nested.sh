# Boot hook of nested-l1 (sourced by /init): mount the payload disk at /data and load the
# KVM module that matches the vCPU (svm -> kvm_amd, vmx -> kvm_intel) with nested=1.
label=$(cat /etc/harness/data_label)
dev=$(findfs "LABEL=$label" 2>/dev/null)
mkdir -p /data
if [ -n "$dev" ]; then
	mount -t ext4 -o ro "$dev" /data || log "mounting $dev at /data failed"
else
	log "no disk labelled $label: L2 payload unavailable"
fi
if grep -qw svm /proc/cpuinfo; then
	modload kvm_amd nested=1 >"$AGENT_RUN/kvm.log" 2>&1 || log "kvm_amd: $(cat "$AGENT_RUN/kvm.log")"
elif grep -qw vmx /proc/cpuinfo; then
	modload kvm_intel nested=1 >"$AGENT_RUN/kvm.log" 2>&1 || log "kvm_intel: $(cat "$AGENT_RUN/kvm.log")"
else
	echo "the vCPU offers neither svm nor vmx" >"$AGENT_RUN/kvm.log"
fi
