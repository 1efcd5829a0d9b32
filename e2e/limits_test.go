package e2e

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestResourceLimits: the agent takes its limits from where it runs. In a memory cgroup of 128 MiB
// with 4,096 files, it sets GOMEMLIMIT to 80% of the cgroup's limit and runs with GOGC 50, and logs
// and reports both; a GOMEMLIMIT or GOGC in its environment wins. (GOMAXPROCS follows the cgroup's
// CPU quota through the Go runtime itself, which never goes below 2: on a 2-CPU machine no quota
// can show it, so the test only checks that it is reported.)
func TestResourceLimits(t *testing.T) {
	meshctl := needMeshctl(t)
	lab := NewLab(t)
	node := lab.Node(t, "node")
	services := filepath.Join(lab.Dir, "services.yaml")
	WriteFileAtomic(t, services, RenderServices([]ServiceSpec{{Name: "web", ClusterIP: "9.251.0.80",
		Ports: []PortSpec{{Name: "http", Port: 80, TargetPort: 8080}}}}))
	const limit, nofile = 128 << 20, 4096

	tests := []struct {
		name   string
		env    []string
		wants  []string // in the "resource limits" log line
		memLim int64    // process.goMemLimit in meshctl status
	}{
		{
			name: "from the cgroup",
			wants: []string{fmt.Sprintf("cgroup_memory_limit=%d", limit), "cgroup_version=1",
				fmt.Sprintf("gomemlimit=%d", int64(limit)*4/5), "gomemlimit_source=cgroup", "gogc=50",
				"gomaxprocs=", fmt.Sprintf("nofile=%d", nofile), fmt.Sprintf("nofile_max=%d", nofile)},
			memLim: int64(limit) * 4 / 5,
		},
		{
			name:   "the environment wins",
			env:    []string{"GOMEMLIMIT=64MiB", "GOGC=100"},
			wants:  []string{"gomemlimit=67108864", "gomemlimit_source=GOMEMLIMIT", "gogc=100"},
			memLim: 64 << 20,
		},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cg := NewMemCgroup(t, lab, fmt.Sprintf("agent%d", i), limit)
			a := StartAgent(t, node, AgentOptions{Meshctl: meshctl, ServicesFile: services, LogLevel: "info",
				Cgroup: cg, NoFile: nofile, Env: tc.env})
			a.WaitReady(t, 30*time.Second)
			var line string
			for l := range strings.Lines(a.Log()) {
				if strings.Contains(l, `msg="resource limits"`) {
					line = l
				}
			}
			if line == "" {
				t.Fatalf("no resource limits in the log:\n%s", a.Tail(20))
			}
			for _, w := range tc.wants {
				if !strings.Contains(line, w) {
					t.Errorf("resource limits line lacks %q:\n%s", w, line)
				}
			}
			var st struct {
				Process struct {
					GoMemLimit int64  `json:"goMemLimit"`
					GOMAXPROCS int    `json:"gomaxprocs"`
					FileLimit  uint64 `json:"fileLimit"`
				} `json:"process"`
			}
			a.CtlJSON(t, &st, "status", "--json")
			if p := st.Process; p.GoMemLimit != tc.memLim || p.GOMAXPROCS < 1 || p.FileLimit != nofile {
				t.Errorf("meshctl status: %+v, want goMemLimit %d, a GOMAXPROCS, fileLimit %d", p, tc.memLim, nofile)
			}
			if err := a.Stop(10 * time.Second); err != nil {
				t.Errorf("stop: %v", err)
			}
		})
	}
}
