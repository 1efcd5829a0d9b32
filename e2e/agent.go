package e2e

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// AgentOptions are the flags of one `meshctl up`. Zero values leave the agent's defaults, except
// where said.
type AgentOptions struct {
	// Meshctl is the binary to run (required).
	Meshctl string
	// NodeName defaults to the node's role.
	NodeName string
	// ServicesFile is --services-file.
	ServicesFile string
	// ResolvConf is --resolv-conf (the upstream resolvers).
	ResolvConf string
	// LogLevel defaults to "debug".
	LogLevel string
	// Extra flags, appended as they are.
	Extra []string
	// Cgroup, when set, is the memory cgroup the agent runs in, with NoFile open files at most
	// (MemCgroup.Command).
	Cgroup *MemCgroup
	NoFile int
	// Env are VAR=value settings for the agent's environment.
	Env []string
}

// Agent is a `meshctl up` running in a node, with a state directory and control socket of its own
// in the lab's directory.
type Agent struct {
	*Proc
	Node          *Node
	Meshctl       string
	ControlSocket string
	StateDir      string
}

// StartAgent starts `meshctl up` in n. It does not wait for readiness: see WaitReady.
func StartAgent(t testing.TB, n *Node, o AgentOptions) *Agent {
	t.Helper()
	if o.NodeName == "" {
		o.NodeName = n.Role
	}
	if o.LogLevel == "" {
		o.LogLevel = "debug"
	}
	a := &Agent{
		Node:          n,
		Meshctl:       o.Meshctl,
		ControlSocket: filepath.Join(n.lab.Dir, n.Role+"-meshctl.sock"),
		StateDir:      filepath.Join(n.lab.Dir, n.Role+"-state"),
	}
	args := []string{o.Meshctl, "up",
		"--node-name", o.NodeName,
		"--state-dir", a.StateDir,
		"--control-socket", a.ControlSocket,
		"--log-level", o.LogLevel,
	}
	if o.ServicesFile != "" {
		args = append(args, "--services-file", o.ServicesFile)
	}
	if o.ResolvConf != "" {
		args = append(args, "--resolv-conf", o.ResolvConf)
	}
	// The WireGuard UAPI socket lives in the host's /var/run/wireguard, shared by every namespace: give
	// each agent its own, unless the test names one.
	if !slices.Contains(o.Extra, "--wg-interface") {
		args = append(args, "--wg-interface", "ew"+n.lab.ID+"-"+n.Role)
	}
	args = append(args, o.Extra...)
	if len(o.Env) > 0 {
		args = append(append([]string{"env"}, o.Env...), args...)
	}
	if o.Cgroup != nil {
		a.Proc = n.lab.start(t, n.Role, "agent", o.Cgroup.Command(n.NS, o.NoFile, args...))
	} else {
		a.Proc = n.Start(t, "agent", args...)
	}
	return a
}

// Ctl runs a meshctl verb against this agent (in its node) and returns its combined output.
func (a *Agent) Ctl(args ...string) (string, error) {
	full := append([]string{a.Meshctl}, args...)
	full = append(full, "--control-socket", a.ControlSocket)
	return a.Node.Exec(full...)
}

// CtlJSON runs a meshctl verb with --json and decodes its output into v.
func (a *Agent) CtlJSON(t testing.TB, v any, args ...string) {
	t.Helper()
	out, err := a.Ctl(append(args, "--json")...)
	if err != nil {
		t.Fatalf("meshctl %v: %v\n%s", args, err, out)
	}
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("meshctl %v --json: output is not the JSON expected: %v\n%s", args, err, out)
	}
}

// WaitReady polls `meshctl status --json` until it succeeds, and returns how long that took. It
// fails t with the agent's log tail if the agent exits or timeout passes.
func (a *Agent) WaitReady(t testing.TB, timeout time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := start.Add(timeout)
	for {
		out, err := a.Ctl("status", "--json")
		if err == nil {
			return time.Since(start)
		}
		if a.Exited() {
			t.Fatalf("agent exited before it was ready (%v); log tail:\n%s", a.Wait(0), a.Tail(40))
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent not ready after %v: last `meshctl status --json`: %v\n%s\nagent log tail:\n%s",
				timeout, err, out, a.Tail(40))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Status is the part of `meshctl status --json` the tests read.
type Status struct {
	Node          string  `json:"node"`
	ServiceCIDR   string  `json:"serviceCIDR"`
	DNSIP         string  `json:"dnsIP"`
	ClusterDomain string  `json:"clusterDomain"`
	TUN           string  `json:"tun"`
	Services      int     `json:"services"`
	Endpoints     int     `json:"endpoints"`
	Uptime        float64 `json:"uptimeSeconds"`
}

// ServiceRow is one element of `meshctl services --json`.
type ServiceRow struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	IP        string `json:"ip"`
	Headless  bool   `json:"headless"`
	Ports     []struct {
		Name     string `json:"name"`
		Protocol string `json:"protocol"`
		Port     int    `json:"port"`
	} `json:"ports"`
	Ready int `json:"ready"`
	Total int `json:"total"`
}

// Services returns `meshctl services --json` keyed by "namespace/name".
func (a *Agent) Services(t testing.TB) map[string]ServiceRow {
	t.Helper()
	var rows []ServiceRow
	a.CtlJSON(t, &rows, "services")
	m := make(map[string]ServiceRow, len(rows))
	for _, r := range rows {
		m[r.Namespace+"/"+r.Name] = r
	}
	return m
}

// String describes the agent for messages.
func (a *Agent) String() string { return fmt.Sprintf("agent in %s", a.Node.Role) }
