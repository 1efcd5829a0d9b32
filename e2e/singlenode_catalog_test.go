package e2e

import (
	"fmt"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// testFailover kills one backend of "fragile" (SIGKILL) in the middle of a loop of requests: no
// request may fail, because the agent retries the next endpoint when a dial is refused. The kill
// falls between two requests: a connection the dead backend's kernel had already accepted when it
// died cannot be saved by any L4 proxy, and is not what this checks.
func (s *singleNode) testFailover(t *testing.T) {
	const n, killAfter = 150, 50
	victim := s.backends[0].procs["fragile"]
	var results []curlResult
	var curlErrs []string
	start := time.Now()
	var killedAt time.Duration
	for i := range n {
		if i == killAfter {
			if err := victim.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			if err := victim.Wait(5 * time.Second); err == nil || !victim.Exited() {
				t.Fatalf("b1's fragile server did not die of SIGKILL: %v", err)
			}
			killedAt = time.Since(start)
		}
		out, err := s.client.Exec("curl", "-sS", "-m", "5", "-w", "\nRESULT %{http_code} %header{x-backend}\n",
			fmt.Sprintf("http://%s/?i=%d", fragileIP, i))
		r := parseCurlResults(out)
		if err != nil || len(r) != 1 {
			curlErrs = append(curlErrs, fmt.Sprintf("request %d: %v: %s", i, err, strings.TrimSpace(out)))
			results = append(results, curlResult{code: "000"})
			continue
		}
		results = append(results, r[0])
	}
	took := time.Since(start)
	counts, failed := countBackends(results)
	if len(failed) > 0 {
		t.Errorf("%d of %d requests failed (b1 killed before request %d): %q", len(failed), n, killAfter, curlErrs)
	}
	before, _ := countBackends(results[:killAfter])
	after, _ := countBackends(results[killAfter:])
	if before["b1"] == 0 {
		t.Errorf("b1 answered none of the %d requests before it was killed: %v", killAfter, before)
	}
	if after["b1"] > 0 {
		t.Errorf("b1 answered %d requests after it was killed", after["b1"])
	}
	if after["b2"] == 0 || after["b3"] == 0 {
		t.Errorf("after b1 was killed, want both b2 and b3 to answer: %v", after)
	}
	var st struct {
		Flows struct {
			DialFailures uint64 `json:"dialFailures"`
			Retries      uint64 `json:"retries"`
		} `json:"flows"`
	}
	s.agent.CtlJSON(t, &st, "status")
	t.Logf("%d requests in %v, b1 killed at %v before request %d: totals %v, after the kill %v; agent flows: %+v",
		n, took.Round(time.Millisecond), killedAt.Round(time.Millisecond), killAfter, counts, after, st.Flows)
}

// testCatalog changes the services file under the running agent.
func (s *singleNode) testCatalog(t *testing.T) {
	t.Run("endpoint removed", s.testEndpointRemoved)
	t.Run("invalid file", s.testInvalidFile)
}

// testEndpointRemoved removes b3 from "shrink" and measures how long new flows still reach it.
func (s *singleNode) testEndpointRemoved(t *testing.T) {
	const limit = time.Second
	request := func() (string, error) {
		out, err := s.client.Exec("curl", "-sS", "-m", "3", "http://"+shrinkIP+"/")
		return strings.TrimSpace(out), err
	}
	// All three answer before the change.
	seen := map[string]bool{}
	Eventually(t, 10*time.Second, 0, "b1, b2 and b3 answer shrink", func() error {
		b, err := request()
		if err != nil {
			return err
		}
		seen[b] = true
		if len(seen) < 3 {
			return fmt.Errorf("seen %v", seen)
		}
		return nil
	})

	specs := slices.Clone(s.specs)
	for i := range specs {
		if specs[i].Name == "shrink" {
			specs[i].Endpoints = s.endpoints("b1", "b2")
		}
	}
	written := time.Now()
	s.writeCatalog(t, specs)

	var lastB3 time.Duration = -1
	var requests, failures int
	for time.Since(written) < limit+2*time.Second {
		started := time.Since(written)
		b, err := request()
		requests++
		if err != nil {
			failures++
			t.Errorf("request at +%v failed: %v", started.Round(time.Millisecond), err)
			continue
		}
		if b == "b3" {
			lastB3 = started
		}
	}
	switch {
	case lastB3 < 0:
		t.Logf("no request reached b3 after the file was written (%d requests in %v)", requests, limit+2*time.Second)
	case lastB3 >= limit:
		t.Errorf("a request started %v after b3 was removed from the file still reached it (limit %v)", lastB3.Round(time.Millisecond), limit)
	default:
		t.Logf("last request to reach b3 started %v after the file was written (limit %v; %d requests)",
			lastB3.Round(time.Millisecond), limit, requests)
	}
	if r := s.agent.Services(t)["default/shrink"]; r.Total != 2 {
		t.Errorf("meshctl services: shrink has %d endpoints, want 2", r.Total)
	}
}

// testInvalidFile writes broken services files: each must be reported in the agent's log with the
// file and the field at fault, while the last good catalog keeps serving.
func (s *singleNode) testInvalidFile(t *testing.T) {
	good := s.specs
	// Each broken file also drops web's endpoints b2 and b3: if the agent applied any of it, web
	// would show one endpoint.
	shrunk := slices.Clone(good)
	for i := range shrunk {
		if shrunk[i].Name == "web" {
			shrunk[i].Endpoints = s.endpoints("b1")
		}
	}
	base := RenderServices(shrunk)
	tests := []struct {
		name    string
		content string
		field   string // what the error must name
	}{
		{"port out of range", base + "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: broken\n  namespace: default\nspec:\n  clusterIP: 9.251.0.99\n  ports:\n  - name: http\n    port: 70000\n", "port"},
		{"bad clusterIP", base + "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: broken\n  namespace: default\nspec:\n  clusterIP: 9.251.0.300\n  ports:\n  - name: http\n    port: 80\n", "clusterIP"},
		{"yaml syntax", base + "---\napiVersion: v1\nkind: Service\nmetadata: {name: broken\n", "line"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			logBefore := len(s.agent.Log())
			WriteFileAtomic(t, s.servicesPath, tc.content)
			var errLine string
			took := Eventually(t, 10*time.Second, 20*time.Millisecond, "agent logs the invalid file", func() error {
				for line := range strings.Lines(s.agent.Log()[logBefore:]) {
					if (strings.Contains(line, "level=ERROR") || strings.Contains(line, "level=WARN")) &&
						strings.Contains(line, s.servicesPath) {
						errLine = strings.TrimSpace(line)
						return nil
					}
				}
				return fmt.Errorf("no ERROR/WARN line naming %s in the new log lines", s.servicesPath)
			})
			t.Logf("reported after %v: %s", took.Round(time.Millisecond), errLine)
			if !strings.Contains(errLine, tc.field) {
				t.Errorf("the error does not name the field %q: %s", tc.field, errLine)
			}
			if r := s.agent.Services(t)["default/web"]; r.Total != 3 {
				t.Errorf("after the invalid file, web has %d endpoints, want the last good catalog's 3", r.Total)
			}
			results := s.curlMany(t, "http://web.default.svc.cluster.local/", 30)
			if counts, failed := countBackends(results); len(failed) > 0 || len(counts) != 3 {
				t.Errorf("web after the invalid file: %v, failures %v; want all 3 backends and no failure", counts, failed)
			}
		})
	}
	// Back to the good file: the agent must take it again (shrink loses b3 as before, web keeps 3).
	s.writeCatalog(t, good)
	// A change the agent can only show by having reloaded: add a service.
	withNew := append(slices.Clone(good), ServiceSpec{Name: "late", ClusterIP: "9.251.0.40",
		Ports: []PortSpec{{Name: "http", Port: 80, TargetPort: 8080}}, Endpoints: s.endpoints("b2")})
	s.writeCatalog(t, withNew)
	took := Eventually(t, 10*time.Second, 20*time.Millisecond, "good file reloaded after invalid ones", func() error {
		out, err := s.client.Exec("curl", "-sS", "-m", "2", "http://late.default.svc.cluster.local/")
		if err != nil || strings.TrimSpace(out) != "b2" {
			return fmt.Errorf("curl late: %v: %s", err, out)
		}
		return nil
	})
	t.Logf("good file served %v after it was written", took.Round(time.Millisecond))
}

// testShutdown sends SIGTERM to the agent: it must exit 0 and remove mesh0 and its routes.
func (s *singleNode) testShutdown(t *testing.T) {
	start := time.Now()
	if err := s.agent.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := s.agent.Wait(15 * time.Second); err != nil {
		// Show where it hangs: SIGQUIT makes a Go program dump its goroutines and exit.
		logBefore := len(s.agent.Log())
		_ = s.agent.Signal(syscall.SIGQUIT)
		_ = s.agent.Wait(5 * time.Second)
		t.Fatalf("agent after SIGTERM: %v; edgewire goroutines at SIGQUIT:\n%s", err, edgewireGoroutines(s.agent.Log()[logBefore:]))
	}
	t.Logf("agent exited %v after SIGTERM", time.Since(start).Round(time.Millisecond))
	if out, err := s.client.Exec("ip", "link", "show", "mesh0"); err == nil {
		t.Errorf("mesh0 still exists after the agent exited:\n%s", out)
	}
	routes := s.client.MustExec(t, "ip", "route", "show", "table", "all")
	for _, dst := range []string{"9.251.", dnsIP} {
		if strings.Contains(routes, dst) {
			t.Errorf("a route to %s remains after the agent exited:\n%s", dst, routes)
		}
	}
	if out, err := s.agent.Ctl("status"); err == nil {
		t.Errorf("meshctl status still succeeds after the agent exited:\n%s", out)
	}
}

// edgewireGoroutines keeps the goroutines of a Go traceback that run edgewire code, without the
// frame-pointer noise.
func edgewireGoroutines(dump string) string {
	var keep []string
	for block := range strings.SplitSeq(dump, "\n\n") {
		if !strings.Contains(block, "github.com/edgewire/") {
			continue
		}
		var lines []string
		for line := range strings.Lines(block) {
			if i := strings.Index(line, " fp=0x"); i >= 0 {
				line = line[:i] + "\n"
			}
			lines = append(lines, line)
		}
		keep = append(keep, strings.Join(lines, ""))
	}
	return strings.Join(keep, "\n")
}
