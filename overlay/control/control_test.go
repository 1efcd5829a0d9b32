package control

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type fakeBackend struct {
	down chan struct{}
}

func (f *fakeBackend) Status() Status { return Status{Node: "edge-1", Services: 3} }
func (f *fakeBackend) Services() []Service {
	return []Service{{Namespace: "default", Name: "web", IP: "9.251.0.10", Ready: 2, Total: 3}}
}
func (f *fakeBackend) Resolve(_ context.Context, name, qtype string) (Resolution, error) {
	if qtype == "BOGUS" {
		return Resolution{}, errors.New("unknown query type")
	}
	return Resolution{Name: name, Type: qtype, Rcode: "NOERROR", Answer: []string{name + " 5 IN A 9.251.0.10"}}, nil
}
func (f *fakeBackend) Down() { close(f.down) }
func (f *fakeBackend) Ping(ctx context.Context, node string, count int, untilDirect bool, each func(PingResult)) error {
	if node == "nobody" {
		return errors.New("unknown node nobody")
	}
	for i := 1; i <= count; i++ {
		each(PingResult{Seq: i, Node: node, Path: "direct", Addr: "198.51.100.2:51820", RTTMs: 0.5})
	}
	return nil
}
func (f *fakeBackend) WireGuard() (WireGuard, error) {
	return WireGuard{Interface: "mesh0", Peers: []WGPeer{{Node: "edge-2", PublicKey: "k"}}}, nil
}

func TestRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctl.sock")
	fb := &fakeBackend{down: make(chan struct{})}
	srv := NewServer(path, fb, nil)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode = %v, want 0600", fi.Mode().Perm())
	}
	c := NewClient(path)
	ctx := context.Background()

	tests := []struct {
		name  string
		check func(t *testing.T)
	}{
		{"status", func(t *testing.T) {
			st, err := c.Status(ctx)
			if err != nil || st.Node != "edge-1" || st.Services != 3 {
				t.Fatalf("Status = %+v, %v", st, err)
			}
		}},
		{"services", func(t *testing.T) {
			svcs, err := c.Services(ctx)
			if err != nil || len(svcs) != 1 || svcs[0].IP != "9.251.0.10" {
				t.Fatalf("Services = %+v, %v", svcs, err)
			}
		}},
		{"resolve", func(t *testing.T) {
			res, err := c.Resolve(ctx, "web.default.svc.cluster.local.", "A")
			if err != nil || res.Rcode != "NOERROR" || len(res.Answer) != 1 {
				t.Fatalf("Resolve = %+v, %v", res, err)
			}
		}},
		{"resolve error carries the agent's message", func(t *testing.T) {
			_, err := c.Resolve(ctx, "x", "BOGUS")
			if err == nil || !strings.Contains(err.Error(), "unknown query type") {
				t.Fatalf("Resolve error = %v", err)
			}
		}},
		{"second server on a live socket is refused", func(t *testing.T) {
			other := NewServer(path, fb, nil)
			err := other.Start()
			if err == nil || !strings.Contains(err.Error(), "another agent") {
				t.Fatalf("Start = %v, want 'another agent' error", err)
			}
			other.Close()
		}},
		{"wireguard", func(t *testing.T) {
			wg, err := c.WireGuard(ctx)
			if err != nil || wg.Interface != "mesh0" || len(wg.Peers) != 1 || wg.Peers[0].Node != "edge-2" {
				t.Fatalf("WireGuard = %+v, %v", wg, err)
			}
		}},
		{"ping streams every probe", func(t *testing.T) {
			var got []PingResult
			err := c.Ping(ctx, "edge-2", 3, false, func(r PingResult) { got = append(got, r) })
			if err != nil || len(got) != 3 || got[2].Seq != 3 || got[0].Path != "direct" {
				t.Fatalf("Ping = %+v, %v", got, err)
			}
		}},
		{"ping error", func(t *testing.T) {
			err := c.Ping(ctx, "nobody", 1, false, func(PingResult) {})
			if err == nil || !strings.Contains(err.Error(), "unknown node") {
				t.Fatalf("Ping error = %v", err)
			}
		}},
		{"down", func(t *testing.T) {
			if err := c.Down(ctx); err != nil {
				t.Fatal(err)
			}
			select {
			case <-fb.down:
			case <-time.After(5 * time.Second):
				t.Fatal("backend never saw Down")
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, tc.check)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if err := srv.Close(); err != nil {
		t.Fatalf("second Close = %v", err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket still exists after Close: %v", err)
	}
}

func TestClientNoAgent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing.sock")
	_, err := NewClient(path).Status(context.Background())
	if err == nil || !strings.Contains(err.Error(), "is `meshctl up` running") {
		t.Fatalf("Status error = %v, want a hint to start the agent", err)
	}
}

func TestStaleSocketReplaced(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctl.sock")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	srv := NewServer(path, &fakeBackend{down: make(chan struct{})}, nil)
	if err := srv.Start(); err != nil {
		t.Fatalf("Start over a stale file = %v", err)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
}
