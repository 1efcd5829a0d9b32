// Package sysres owns the process's share of the machine: it reads the memory limit of the cgroup
// the process runs in (cgroup v1 memory.limit_in_bytes or v2 memory.max, the smallest on the path
// to the root), turns it into the Go runtime's soft memory limit (GOMEMLIMIT), raises the soft
// RLIMIT_NOFILE to the hard limit, and reports what is in force so the agent and the relay can log
// it and size their own caps from it.
//
// GOMAXPROCS needs no code here: since Go 1.25 the runtime itself sets it from the cgroup's CPU
// quota (v1 cpu.cfs_quota_us, v2 cpu.max) and follows changes to it; Apply only reports it.
//
// The cgroup files are read below a root directory (Host reads "/"), so tests run the same code
// over fixture trees of both cgroup versions.
package sysres

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"syscall"
)

// DefaultGCPercent is the GOGC the agent runs with unless the environment sets one: the heap may
// grow by half its live size between collections instead of doubling. Most of an agent's heap
// under load is packet buffers without pointers, which cost a collection nothing to scan, so
// collecting twice as often is cheap, and it keeps the peak of a bulk transfer a third lower.
const DefaultGCPercent = 50

// DefaultMemoryRatio is the share of the cgroup memory limit given to the Go heap as GOMEMLIMIT.
// The rest covers what the runtime does not count (kernel socket buffers charged to the cgroup,
// the binary's text, thread stacks).
const DefaultMemoryRatio = 0.8

// FS reads cgroup information below Root ("" or "/" is the host).
type FS struct {
	Root string
}

// Host is the running system.
var Host = FS{Root: "/"}

func (f FS) path(p string) string {
	if f.Root == "" {
		return p
	}
	return filepath.Join(f.Root, p)
}

// MemoryLimit is a memory limit found in a cgroup.
type MemoryLimit struct {
	Bytes   uint64 // 0: no limit anywhere on the path
	Version int    // 1 or 2; 0 when no memory controller was found
	Path    string // the cgroup directory whose limit is the smallest
}

// noLimitV1 is above any real limit: cgroup v1 reports "unlimited" as a page-aligned huge number
// (9223372036854771712 on 4 KiB pages).
const noLimitV1 = 1 << 62

// MemoryLimit returns the smallest memory limit on the path from the process's cgroup to the
// root of its hierarchy. It prefers the v1 memory controller when the process is in one (hybrid
// hosts mount both, and only one of them holds the memory controller), else v2.
func (f FS) MemoryLimit() (MemoryLimit, error) {
	groups, err := f.readCgroups()
	if err != nil {
		return MemoryLimit{}, err
	}
	mounts, err := f.readMounts()
	if err != nil {
		return MemoryLimit{}, err
	}
	if rel, ok := groups["memory"]; ok {
		if m, ok := mountFor(mounts, "cgroup", "memory"); ok {
			return f.walk(m, rel, 1, "memory.limit_in_bytes")
		}
	}
	if rel, ok := groups[""]; ok {
		if m, ok := mountFor(mounts, "cgroup2", ""); ok {
			dir := f.path(m.point)
			ctrl, err := os.ReadFile(filepath.Join(dir, "cgroup.controllers"))
			if err == nil && !slices.Contains(strings.Fields(string(ctrl)), "memory") {
				return MemoryLimit{}, nil // a v2 hierarchy without the memory controller
			}
			return f.walk(m, rel, 2, "memory.max")
		}
	}
	return MemoryLimit{}, nil
}

// walk reads file in the cgroup directory of rel and each of its parents up to the mount's root and
// returns the smallest limit.
func (f FS) walk(m mount, rel string, version int, file string) (MemoryLimit, error) {
	// The mount shows the hierarchy from m.root down; a cgroup path outside it (a namespace whose
	// root is below it) is read from the mount point itself.
	sub, err := filepath.Rel(m.root, rel)
	if err != nil || strings.HasPrefix(sub, "..") {
		sub = "."
	}
	out := MemoryLimit{Version: version}
	dir := filepath.Join(m.point, sub)
	for {
		data, err := os.ReadFile(f.path(filepath.Join(dir, file)))
		switch {
		case errors.Is(err, os.ErrNotExist):
			// The root cgroup has no limit file.
		case err != nil:
			return MemoryLimit{}, fmt.Errorf("cgroup v%d: %w", version, err)
		default:
			v, limited, err := parseLimit(string(data))
			if err != nil {
				return MemoryLimit{}, fmt.Errorf("cgroup v%d: %s: %w", version, filepath.Join(dir, file), err)
			}
			if limited && (out.Bytes == 0 || v < out.Bytes) {
				out.Bytes, out.Path = v, dir
			}
		}
		if dir == m.point || dir == "/" || dir == "." {
			return out, nil
		}
		dir = filepath.Dir(dir)
	}
}

// parseLimit reads a memory limit file: a number of bytes, or "max" (v2) / a huge number (v1) for
// no limit.
func parseLimit(s string) (v uint64, limited bool, err error) {
	s = strings.TrimSpace(s)
	if s == "max" {
		return 0, false, nil
	}
	v, err = strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, false, fmt.Errorf("limit %q: not a number of bytes or \"max\"", s)
	}
	return v, v < noLimitV1, nil
}

// readCgroups parses /proc/self/cgroup into controller -> path; the v2 hierarchy is under "".
func (f FS) readCgroups() (map[string]string, error) {
	data, err := os.ReadFile(f.path("/proc/self/cgroup"))
	if err != nil {
		return nil, fmt.Errorf("cgroup: %w", err)
	}
	out := make(map[string]string)
	for i, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			return nil, fmt.Errorf("cgroup: /proc/self/cgroup line %d %q: want ID:CONTROLLERS:PATH", i+1, line)
		}
		if parts[0] == "0" && parts[1] == "" {
			out[""] = parts[2]
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			out[c] = parts[2]
		}
	}
	return out, nil
}

type mount struct {
	root, point, fstype string
	opts                []string // super options
}

// readMounts parses the cgroup mounts of /proc/self/mountinfo.
func (f FS) readMounts() ([]mount, error) {
	file, err := os.Open(f.path("/proc/self/mountinfo"))
	if err != nil {
		return nil, fmt.Errorf("cgroup: %w", err)
	}
	defer file.Close()
	var out []mount
	sc := bufio.NewScanner(file)
	for n := 1; sc.Scan(); n++ {
		// ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, fl := range fields {
			if fl == "-" {
				sep = i
				break
			}
		}
		if sep < 5 || len(fields) < sep+4 {
			return nil, fmt.Errorf("cgroup: /proc/self/mountinfo line %d: malformed", n)
		}
		fstype := fields[sep+1]
		if fstype != "cgroup" && fstype != "cgroup2" {
			continue
		}
		out = append(out, mount{
			root: unescape(fields[3]), point: unescape(fields[4]), fstype: fstype,
			opts: strings.Split(fields[sep+3], ","),
		})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("cgroup: /proc/self/mountinfo: %w", err)
	}
	return out, nil
}

// unescape undoes mountinfo's octal escapes (\040 for a space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// mountFor finds the mount of fstype that holds controller (any cgroup2 mount when controller is
// "").
func mountFor(mounts []mount, fstype, controller string) (mount, bool) {
	for _, m := range mounts {
		if m.fstype != fstype {
			continue
		}
		if controller == "" {
			return m, true
		}
		for _, o := range m.opts {
			if o == controller {
				return m, true
			}
		}
	}
	return mount{}, false
}

// Report says what Apply found and set.
type Report struct {
	Memory      MemoryLimit
	GoMemLimit  int64  // the runtime's soft limit in force; math.MaxInt64 when none
	GoMemSource string // "cgroup", "GOMEMLIMIT" (the environment wins), or "none"
	GCPercent   int    // GOGC in force
	GOMAXPROCS  int
	NumCPU      int
	NoFile      uint64 // soft RLIMIT_NOFILE in force
	NoFileMax   uint64 // hard RLIMIT_NOFILE
}

// LogAttrs are the report as log attributes.
func (r Report) LogAttrs() []any {
	return []any{
		"cgroup_memory_limit", r.Memory.Bytes, "cgroup_version", r.Memory.Version,
		"gomemlimit", r.GoMemLimit, "gomemlimit_source", r.GoMemSource, "gogc", r.GCPercent,
		"gomaxprocs", r.GOMAXPROCS, "cpus", r.NumCPU,
		"nofile", r.NoFile, "nofile_max", r.NoFileMax,
	}
}

// Apply sets the Go soft memory limit to ratio (DefaultMemoryRatio when <= 0) of the cgroup
// memory limit, unless the GOMEMLIMIT environment variable is set, sets GOGC to gcPercent unless
// the GOGC environment variable is set (0 leaves it alone), raises the soft RLIMIT_NOFILE
// to the hard limit, and logs and returns what is in force. Failing to read the cgroup is logged
// and leaves the memory limit alone: the process still runs.
func Apply(logger *slog.Logger, f FS, ratio float64, gcPercent int) Report {
	if ratio <= 0 || ratio > 1 {
		ratio = DefaultMemoryRatio
	}
	var r Report
	mem, err := f.MemoryLimit()
	if err != nil {
		logger.Warn("cannot read the cgroup memory limit: GOMEMLIMIT left alone", "err", err)
	}
	r.Memory = mem
	switch {
	case os.Getenv("GOMEMLIMIT") != "":
		r.GoMemSource = "GOMEMLIMIT"
	case mem.Bytes > 0:
		debug.SetMemoryLimit(int64(float64(mem.Bytes) * ratio))
		r.GoMemSource = "cgroup"
	default:
		r.GoMemSource = "none"
	}
	r.GoMemLimit = debug.SetMemoryLimit(-1)
	if gcPercent > 0 && os.Getenv("GOGC") == "" {
		debug.SetGCPercent(gcPercent)
	}
	r.GCPercent = debug.SetGCPercent(-1)
	debug.SetGCPercent(r.GCPercent)
	r.GOMAXPROCS = runtime.GOMAXPROCS(0)
	r.NumCPU = runtime.NumCPU()
	soft, hard, err := RaiseNoFile()
	if err != nil {
		logger.Warn("cannot raise the file descriptor limit", "err", err)
	}
	r.NoFile, r.NoFileMax = soft, hard
	logger.Info("resource limits", r.LogAttrs()...)
	return r
}

// RaiseNoFile raises the soft RLIMIT_NOFILE to the hard limit and returns both as in force. (The
// Go runtime raises it at start already; this makes it explicit and reports it.) The hard limit is
// the operator's policy (systemd LimitNOFILE, the container runtime's ulimit) and is left alone.
func RaiseNoFile() (soft, hard uint64, err error) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0, 0, fmt.Errorf("getrlimit NOFILE: %w", err)
	}
	if rl.Cur < rl.Max {
		want := rl
		want.Cur = rl.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err != nil {
			return rl.Cur, rl.Max, fmt.Errorf("setrlimit NOFILE %d: %w", want.Cur, err)
		}
		rl = want
	}
	return rl.Cur, rl.Max, nil
}

// NoFile returns the soft RLIMIT_NOFILE in force (0 when it cannot be read).
func NoFile() uint64 {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0
	}
	return rl.Cur
}

// Usage is what the process holds now.
type Usage struct {
	RSSBytes   uint64 // resident set size
	PeakRSS    uint64 // the most it has been resident (VmHWM)
	OpenFiles  int    // open file descriptors
	Goroutines int
}

// ReadUsage reads the process's usage from /proc/self. A field it cannot read is zero.
func ReadUsage() Usage {
	u := Usage{Goroutines: runtime.NumGoroutine()}
	if data, err := os.ReadFile("/proc/self/status"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			key, val, ok := strings.Cut(line, ":")
			if !ok || (key != "VmRSS" && key != "VmHWM") {
				continue
			}
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(val), " kB"), 10, 64)
			if err != nil {
				continue
			}
			if key == "VmRSS" {
				u.RSSBytes = kb << 10
			} else {
				u.PeakRSS = kb << 10
			}
		}
	}
	if d, err := os.Open("/proc/self/fd"); err == nil {
		names, _ := d.Readdirnames(-1)
		d.Close()
		u.OpenFiles = max(0, len(names)-1) // less the descriptor of the listing itself
	}
	return u
}
