"""Running guests: the QEMU process and its QMP, the machine a test holds, SSH into the
guest, serial consoles, swtpm, saved states (snapshots) to start from."""
