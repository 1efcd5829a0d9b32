//go:build bench

package e2e

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"
)

// load runs TestLoad's scenarios (load_test.go) and records, for each, each agent's peak RSS and
// time back to its idle footprint, and what the ordinary client saw, beside the goals of the issue
// "The agent stays up under load". The goals are printed, not enforced: TestLoad enforces them in
// make test.
func (b *bench) load(t *testing.T) {
	ll := newLoadLab(t)
	for _, ld := range loadScenarios() {
		t.Run(ld.name, func(t *testing.T) {
			o := ll.measure(t, ld)
			p := "load." + strings.ReplaceAll(ld.name, " ", "-") + "."
			for i, a := range ll.agents {
				role := a.Node.Role
				m := &Measurement{Name: p + "peak-rss." + role, Value: mib(o.peak[i]), Unit: "MiB",
					Raw: map[string]any{"idle": o.idle[i], "after": o.final[i], "oomKills": o.oomKills[i]}}
				m.Goal = &Goal{Text: fmt.Sprintf("≤ %d MiB", loadPeakRSS>>20), Met: o.peak[i] <= loadPeakRSS && o.oomKills[i] == 0}
				b.report.Add(m)
				rec := &Measurement{Name: p + "recovery." + role, Value: o.recovered[i].Seconds(), Unit: "s",
					Raw: map[string]any{"after": o.final[i].String(), "idle": o.idle[i].String()}}
				rec.Goal = &Goal{Text: fmt.Sprintf("≤ %v (-1: not back)", loadRecovery), Met: o.recovered[i] >= 0}
				b.report.Add(rec)
			}
			pr := o.probe
			dns := &Measurement{Name: p + "dns-within-100ms", Value: 100 * float64(pr.DNSWithin100ms) / float64(max(pr.DNSQueries, 1)),
				Unit: "%", Raw: pr}
			dns.Goal = &Goal{Text: "≥ 99%", Met: float64(pr.DNSWithin100ms) >= 0.99*float64(pr.DNSQueries) && pr.DNSQueries > 0}
			b.report.Add(dns)
			req := &Measurement{Name: p + "failed-requests", Value: float64(pr.RequestFailures), Unit: "requests",
				Raw: map[string]any{"requests": pr.Requests, "p99us": pr.RequestP99}}
			req.Goal = &Goal{Text: "0", Met: pr.RequestFailures == 0 && pr.Requests > 0}
			b.report.Add(req)
		})
	}
	b.loadEdgeMesh(t, ll)
}

// loadEdgeMesh measures the reference: the EdgeMesh-style stream tunnel (edgemeshref) between the
// same two nodes carries the same 4-stream bulk load; its server (node1) and client (node2) peak
// RSS are the references of the agents' bulk peaks.
func (b *bench) loadEdgeMesh(t *testing.T, ll *loadLab) {
	if b.tools.EdgeMeshRef == "" {
		b.report.Fail("load.bulk-4-TCP-streams.peak-rss.edgemesh", fmt.Errorf("edgemeshref not built"))
		return
	}
	b.daemons = nil
	local := b.edgemeshRef(t, ll.lab, ll.node1, ll.node2, "10.77.5.1", "10.244.1.10")
	server, client := b.daemons[0].proc, b.daemons[1].proc
	out, err := ll.node2.ExecTimeout(loadDuration+30*time.Second, "iperf3", "-c", local, "-p", strconv.Itoa(benchIperf),
		"-P", "4", "-t", strconv.Itoa(int(loadDuration/time.Second)), "-J")
	if _, err := parseIperfOutput(out, err); err != nil {
		b.report.Fail("load.bulk-4-TCP-streams.peak-rss.edgemesh", err)
		return
	}
	p := "load.bulk-4-TCP-streams.peak-rss."
	for _, ref := range []struct {
		proc  *Proc
		role  string
		agent string
	}{{server, "edgemesh-server", "node1"}, {client, "edgemesh-client", "node2"}} {
		peak, err := procPeakRSS(ref.proc.PID())
		if err != nil {
			b.report.Fail(p+ref.role, err)
			continue
		}
		b.report.Add(&Measurement{Name: p + ref.role, Value: mib(peak), Unit: "MiB"})
		if m := b.report.byName[p+ref.agent]; m != nil {
			b.report.Add(&Measurement{Name: p + ref.agent + ".vs-edgemesh", Value: m.Value, Unit: "MiB", Raw: m.Raw}, p+ref.role)
		}
	}
}
