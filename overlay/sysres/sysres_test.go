package sysres

import (
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
)

// tree writes files (path -> content) below a temporary root.
func tree(t *testing.T, files map[string]string) FS {
	t.Helper()
	root := t.TempDir()
	for p, content := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return FS{Root: root}
}

const (
	mountsV1 = `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`
	cgroupV1 = `9:name=systemd:/
4:memory:/kubepods/pod1/ctr
2:cpu,cpuacct:/kubepods/pod1/ctr
0::/
`
	mountsV2 = `25 30 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
`
	cgroupV2 = "0::/system.slice/edgewire.service\n"
)

func TestMemoryLimit(t *testing.T) {
	tests := []struct {
		name    string
		files   map[string]string
		want    MemoryLimit
		wantErr string
	}{
		{
			name: "v1 limit on the process's own cgroup",
			files: map[string]string{
				"proc/self/mountinfo": mountsV1, "proc/self/cgroup": cgroupV1,
				"sys/fs/cgroup/memory/kubepods/pod1/ctr/memory.limit_in_bytes": "268435456\n",
				"sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes":     "536870912\n",
				"sys/fs/cgroup/memory/kubepods/memory.limit_in_bytes":          "9223372036854771712\n",
			},
			want: MemoryLimit{Bytes: 256 << 20, Version: 1, Path: "/sys/fs/cgroup/memory/kubepods/pod1/ctr"},
		},
		{
			name: "v1 smaller limit on a parent wins",
			files: map[string]string{
				"proc/self/mountinfo": mountsV1, "proc/self/cgroup": cgroupV1,
				"sys/fs/cgroup/memory/kubepods/pod1/ctr/memory.limit_in_bytes": "9223372036854771712\n",
				"sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes":     "134217728\n",
			},
			want: MemoryLimit{Bytes: 128 << 20, Version: 1, Path: "/sys/fs/cgroup/memory/kubepods/pod1"},
		},
		{
			name: "v1 unlimited",
			files: map[string]string{
				"proc/self/mountinfo": mountsV1, "proc/self/cgroup": cgroupV1,
				"sys/fs/cgroup/memory/kubepods/pod1/ctr/memory.limit_in_bytes": "9223372036854771712\n",
			},
			want: MemoryLimit{Version: 1},
		},
		{
			name: "v1 namespaced cgroup: the mount root is the process's cgroup",
			files: map[string]string{
				"proc/self/mountinfo":                        "35 31 0:32 /kubepods/pod1/ctr /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n",
				"proc/self/cgroup":                           "4:memory:/kubepods/pod1/ctr\n",
				"sys/fs/cgroup/memory/memory.limit_in_bytes": "104857600\n",
			},
			want: MemoryLimit{Bytes: 100 << 20, Version: 1, Path: "/sys/fs/cgroup/memory"},
		},
		{
			name: "v2 memory.max",
			files: map[string]string{
				"proc/self/mountinfo": mountsV2, "proc/self/cgroup": cgroupV2,
				"sys/fs/cgroup/cgroup.controllers":                       "cpuset cpu io memory pids\n",
				"sys/fs/cgroup/system.slice/edgewire.service/memory.max": "268435456\n",
				"sys/fs/cgroup/system.slice/memory.max":                  "max\n",
			},
			want: MemoryLimit{Bytes: 256 << 20, Version: 2, Path: "/sys/fs/cgroup/system.slice/edgewire.service"},
		},
		{
			name: "v2 parent limit wins",
			files: map[string]string{
				"proc/self/mountinfo": mountsV2, "proc/self/cgroup": cgroupV2,
				"sys/fs/cgroup/cgroup.controllers":                       "memory pids\n",
				"sys/fs/cgroup/system.slice/edgewire.service/memory.max": "max\n",
				"sys/fs/cgroup/system.slice/memory.max":                  "209715200\n",
			},
			want: MemoryLimit{Bytes: 200 << 20, Version: 2, Path: "/sys/fs/cgroup/system.slice"},
		},
		{
			name: "v2 no limit",
			files: map[string]string{
				"proc/self/mountinfo": mountsV2, "proc/self/cgroup": cgroupV2,
				"sys/fs/cgroup/cgroup.controllers":                       "memory\n",
				"sys/fs/cgroup/system.slice/edgewire.service/memory.max": "max\n",
			},
			want: MemoryLimit{Version: 2},
		},
		{
			name: "v2 without the memory controller",
			files: map[string]string{
				"proc/self/mountinfo": mountsV2, "proc/self/cgroup": cgroupV2,
				"sys/fs/cgroup/cgroup.controllers": "cpu pids\n",
			},
			want: MemoryLimit{},
		},
		{
			name: "no cgroup mounts",
			files: map[string]string{
				"proc/self/mountinfo": "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n", "proc/self/cgroup": cgroupV2,
			},
			want: MemoryLimit{},
		},
		{
			name: "malformed limit",
			files: map[string]string{
				"proc/self/mountinfo": mountsV2, "proc/self/cgroup": cgroupV2,
				"sys/fs/cgroup/cgroup.controllers":                       "memory\n",
				"sys/fs/cgroup/system.slice/edgewire.service/memory.max": "lots\n",
			},
			wantErr: `memory.max: limit "lots"`,
		},
		{
			name:    "malformed cgroup file",
			files:   map[string]string{"proc/self/mountinfo": mountsV2, "proc/self/cgroup": "garbage\n"},
			wantErr: "line 1",
		},
		{
			name:    "no proc",
			files:   map[string]string{},
			wantErr: "/proc/self/cgroup",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tree(t, tc.files).MemoryLimit()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("MemoryLimit() = %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{`/a\040b`: "/a b", `/plain`: "/plain", `/end\04`: `/end\04`} {
		if got := unescape(in); got != want {
			t.Errorf("unescape(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestRaiseNoFile(t *testing.T) {
	soft, hard, err := RaiseNoFile()
	if err != nil {
		t.Fatal(err)
	}
	if soft != hard || soft == 0 {
		t.Errorf("after RaiseNoFile soft = %d, hard = %d: want soft raised to hard", soft, hard)
	}
	if got := NoFile(); got != soft {
		t.Errorf("NoFile() = %d, want %d", got, soft)
	}
}

func TestApply(t *testing.T) {
	prev := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(prev) })
	fs := tree(t, map[string]string{
		"proc/self/mountinfo": mountsV2, "proc/self/cgroup": cgroupV2,
		"sys/fs/cgroup/cgroup.controllers":                       "memory\n",
		"sys/fs/cgroup/system.slice/edgewire.service/memory.max": "268435456\n",
	})
	logger := slog.New(slog.DiscardHandler)

	t.Run("from the cgroup", func(t *testing.T) {
		t.Setenv("GOMEMLIMIT", "")
		r := Apply(logger, fs, 0.5, 0)
		if r.GoMemSource != "cgroup" || r.GoMemLimit != 128<<20 || debug.SetMemoryLimit(-1) != 128<<20 {
			t.Errorf("report %+v, runtime limit %d: want 128 MiB from the cgroup", r, debug.SetMemoryLimit(-1))
		}
		if r.GOMAXPROCS != runtime.GOMAXPROCS(0) || r.NoFile == 0 {
			t.Errorf("report %+v: GOMAXPROCS or NOFILE missing", r)
		}
	})
	t.Run("the environment wins", func(t *testing.T) {
		debug.SetMemoryLimit(math.MaxInt64)
		t.Setenv("GOMEMLIMIT", "64MiB")
		r := Apply(logger, fs, 0.5, 0)
		if r.GoMemSource != "GOMEMLIMIT" || debug.SetMemoryLimit(-1) != math.MaxInt64 {
			t.Errorf("report %+v: the cgroup overrode GOMEMLIMIT", r)
		}
	})
	t.Run("GOGC", func(t *testing.T) {
		prevGC := debug.SetGCPercent(100)
		defer debug.SetGCPercent(prevGC)
		t.Setenv("GOGC", "")
		if r := Apply(logger, fs, 0.5, DefaultGCPercent); r.GCPercent != DefaultGCPercent {
			t.Errorf("GCPercent %d, want %d", r.GCPercent, DefaultGCPercent)
		}
		debug.SetGCPercent(100)
		t.Setenv("GOGC", "100")
		if r := Apply(logger, fs, 0.5, DefaultGCPercent); r.GCPercent != 100 {
			t.Errorf("GCPercent %d with GOGC=100 in the environment, want 100", r.GCPercent)
		}
	})
	t.Run("no limit", func(t *testing.T) {
		debug.SetMemoryLimit(math.MaxInt64)
		t.Setenv("GOMEMLIMIT", "")
		r := Apply(logger, FS{Root: t.TempDir()}, 0, 0)
		if r.GoMemSource != "none" || r.GoMemLimit != math.MaxInt64 {
			t.Errorf("report %+v: want no limit when the cgroup cannot be read", r)
		}
	})
}

func TestReadUsage(t *testing.T) {
	before := ReadUsage()
	f, err := os.Open(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	during := ReadUsage()
	f.Close()
	if before.RSSBytes == 0 || before.PeakRSS < before.RSSBytes || before.Goroutines == 0 {
		t.Errorf("usage %+v: RSS, peak or goroutines missing", before)
	}
	if during.OpenFiles != before.OpenFiles+1 {
		t.Errorf("open files %d with one more file open, %d before", during.OpenFiles, before.OpenFiles)
	}
}
