package e2e

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestAgentLifecycle covers how the agent starts and stops, each case in a namespace of its own.
func TestAgentLifecycle(t *testing.T) {
	meshctl := needMeshctl(t)
	web := []ServiceSpec{{Name: "web", ClusterIP: "9.251.0.10",
		Ports:     []PortSpec{{Name: "http", Port: 80, TargetPort: 8080}},
		Endpoints: []EndpointSpec{{IP: "10.77.1.11", Ready: true, Node: "node"}}}}

	// noTUN checks that the agent left nothing behind in n.
	noTUN := func(t *testing.T, n *Node) {
		t.Helper()
		if out, err := n.Exec("ip", "link", "show", "mesh0"); err == nil {
			t.Errorf("mesh0 exists:\n%s", out)
		}
		if routes := n.MustExec(t, "ip", "route", "show", "table", "all"); strings.Contains(routes, "9.251.") || strings.Contains(routes, dnsIP) {
			t.Errorf("mesh routes exist:\n%s", routes)
		}
	}

	t.Run("meshctl down", func(t *testing.T) {
		lab := NewLab(t)
		n := lab.Node(t, "node")
		file := filepath.Join(lab.Dir, "services.yaml")
		WriteFileAtomic(t, file, RenderServices(web))
		agent := StartAgent(t, n, AgentOptions{Meshctl: meshctl, ServicesFile: file})
		agent.WaitReady(t, 30*time.Second)
		start := time.Now()
		if out, err := agent.Ctl("down"); err != nil {
			t.Fatalf("meshctl down: %v\n%s", err, out)
		}
		if err := agent.Wait(15 * time.Second); err != nil {
			t.Fatalf("agent after meshctl down: %v\n%s", err, agent.Tail(20))
		}
		t.Logf("agent exited %v after meshctl down", time.Since(start).Round(time.Millisecond))
		noTUN(t, n)
	})

	bad := []struct {
		name    string
		content string
		want    string // in the agent's output
	}{
		{"invalid services file", RenderServices(web) + "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: broken\nspec:\n  ports:\n  - port: 0\n", "port"},
		{"missing services file", "", "no such file"},
	}
	for _, tc := range bad {
		t.Run("refuses to start with "+tc.name, func(t *testing.T) {
			lab := NewLab(t)
			n := lab.Node(t, "node")
			file := filepath.Join(lab.Dir, "services.yaml")
			if tc.content != "" {
				WriteFileAtomic(t, file, tc.content)
			}
			agent := StartAgent(t, n, AgentOptions{Meshctl: meshctl, ServicesFile: file})
			err := agent.Wait(15 * time.Second)
			if err == nil || !agent.Exited() {
				t.Fatalf("agent with a %s: want a prompt non-zero exit, got %v\n%s", tc.name, err, agent.Tail(20))
			}
			log := agent.Log()
			if !strings.Contains(log, file) || !strings.Contains(log, tc.want) {
				t.Errorf("agent output does not name %s and %q:\n%s", file, tc.want, lastLines(log, 10))
			}
			noTUN(t, n)
		})
	}

	t.Run("restart keeps derived service IP", func(t *testing.T) {
		lab := NewLab(t)
		n := lab.Node(t, "node")
		file := filepath.Join(lab.Dir, "services.yaml")
		derived := []ServiceSpec{{Name: "derived", Namespace: "shop",
			Ports:     []PortSpec{{Name: "http", Port: 80, TargetPort: 8080}},
			Endpoints: []EndpointSpec{{IP: "10.77.1.11", Ready: true, Node: "node"}}}}
		WriteFileAtomic(t, file, RenderServices(derived))
		var ips []string
		for run := range 2 {
			agent := StartAgent(t, n, AgentOptions{Meshctl: meshctl, ServicesFile: file})
			agent.WaitReady(t, 30*time.Second)
			ip := agent.Services(t)["shop/derived"].IP
			if _, err := netip.ParseAddr(ip); err != nil {
				t.Fatalf("run %d: shop/derived has no service IP (%q)", run, ip)
			}
			ips = append(ips, ip)
			if err := agent.Stop(15 * time.Second); err != nil {
				t.Fatalf("run %d: stop agent: %v\n%s", run, err, agent.Tail(20))
			}
			// The next run's log goes to the same file: mark the boundary.
			if f, err := os.OpenFile(agent.LogPath, os.O_APPEND|os.O_WRONLY, 0); err == nil {
				f.WriteString("--- restart ---\n")
				f.Close()
			}
		}
		if ips[0] != ips[1] {
			t.Errorf("derived service IP changed across a restart: %s then %s", ips[0], ips[1])
		}
		t.Logf("shop/derived: %s in both runs", ips[0])
	})
}
