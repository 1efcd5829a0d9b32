package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// memCgroupRoot is where the cgroup v1 memory controller is mounted.
const memCgroupRoot = "/sys/fs/cgroup/memory"

// MemCgroup is a cgroup v1 memory cgroup a test created, with a limit. Processes enter it through
// Command; the test's cleanup moves what is left to the parent and removes it.
type MemCgroup struct {
	Path string
}

// NewMemCgroup creates the memory cgroup ew<lab>-<role> below the test process's own memory cgroup,
// limited to limit bytes (swap included, so the limit is a hard one). It fails t, saying what is
// missing, on a machine without the v1 memory controller.
func NewMemCgroup(t testing.TB, lab *Lab, role string, limit int64) *MemCgroup {
	t.Helper()
	parent, err := ownCgroup("memory")
	if err != nil {
		t.Fatalf("memory cgroup: %v (the load tests need the cgroup v1 memory controller at %s)", err, memCgroupRoot)
	}
	cg := &MemCgroup{Path: filepath.Join(parent, lab.Name(role))}
	if err := os.Mkdir(cg.Path, 0o755); err != nil {
		t.Fatalf("memory cgroup: %v", err)
	}
	t.Cleanup(func() { cg.remove(t, parent) })
	cg.write(t, "memory.limit_in_bytes", strconv.FormatInt(limit, 10))
	// memsw exists only with swap accounting; where it does, make swap no way out of the limit.
	if _, err := os.Stat(filepath.Join(cg.Path, "memory.memsw.limit_in_bytes")); err == nil {
		cg.write(t, "memory.memsw.limit_in_bytes", strconv.FormatInt(limit, 10))
	}
	return cg
}

// ownCgroup is this process's cgroup directory of the v1 controller (memory, cpu).
func ownCgroup(controller string) (string, error) {
	data, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(data), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 || !strings.Contains(","+parts[1]+",", ","+controller+",") {
			continue
		}
		// The hierarchy may be mounted under a combined name (cpu,cpuacct).
		for _, mount := range []string{controller, parts[1]} {
			dir := filepath.Join("/sys/fs/cgroup", mount, parts[2])
			if _, err := os.Stat(filepath.Join(dir, "cgroup.procs")); err == nil {
				return dir, nil
			}
		}
		return "", fmt.Errorf("no %s hierarchy mounted under /sys/fs/cgroup", controller)
	}
	return "", fmt.Errorf("no %s controller in /proc/self/cgroup", controller)
}

func (cg *MemCgroup) write(t testing.TB, file, value string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(cg.Path, file), []byte(value), 0o644); err != nil {
		t.Fatalf("memory cgroup %s: %v", file, err)
	}
}

// Command returns the argv that runs args in network namespace ns inside the cgroup, with its open
// files limited to nofile (soft and hard): the process enters the cgroup in the root namespace,
// `ip netns exec` then gives it a mount namespace of its own with a fresh /sys, where the memory
// hierarchy is mounted again at /sys/fs/cgroup (as a container runtime mounts a container's), so
// that the process can read its own limit. Every step execs in place: the PID is the one started.
func (cg *MemCgroup) Command(ns string, nofile int, args ...string) []string {
	procs := filepath.Join(cg.Path, "cgroup.procs")
	inner := `mount -t cgroup -o memory cgroup /sys/fs/cgroup && exec "$@"`
	return append([]string{"sh", "-c", `echo $$ > "$0" && exec "$@"`, procs,
		"ip", "netns", "exec", ns, "sh", "-c", inner, "cgroup-mount",
		"prlimit", fmt.Sprintf("--nofile=%d:%d", nofile, nofile), "--"}, args...)
}

// Stat reads one value of memory.stat, memory.oom_control or a single-value file.
func (cg *MemCgroup) Stat(file, key string) (int64, error) {
	data, err := os.ReadFile(filepath.Join(cg.Path, file))
	if err != nil {
		return 0, err
	}
	if key == "" {
		return strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(line, " "); ok && k == key {
			return strconv.ParseInt(v, 10, 64)
		}
	}
	return 0, fmt.Errorf("%s: no %s", file, key)
}

// OOMKills is how many processes the kernel killed for this cgroup's limit.
func (cg *MemCgroup) OOMKills() (int64, error) {
	return cg.Stat("memory.oom_control", "oom_kill")
}

// remove moves what still runs in the cgroup to parent and removes it.
func (cg *MemCgroup) remove(t testing.TB, parent string) {
	data, _ := os.ReadFile(filepath.Join(cg.Path, "cgroup.procs"))
	for _, pid := range strings.Fields(string(data)) {
		os.WriteFile(filepath.Join(parent, "cgroup.procs"), []byte(pid), 0o644)
	}
	if err := os.Remove(cg.Path); err != nil {
		t.Errorf("remove memory cgroup: %v", err)
	}
}
