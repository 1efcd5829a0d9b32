package overlay

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"sync"
	"time"
)

// health is the agent's HTTP health endpoint (--health-addr), for kubelet probes and load
// balancers:
//
//	GET /healthz  200 "ok" while the agent's HTTP server runs
//	GET /readyz   200 "ready" once the catalog is applied, the data plane is up and a live round
//	              trip through it answers; else 503 with what it waits for or what failed
//	/debug/pprof/ the Go profiler, only with --pprof
//
// The round trip of /readyz is a DNS query over TCP from the host to the agent's DNS address: the
// kernel's route to the TUN, the TUN reader, the service netstack, the DNS server and back. An agent
// whose data path is wedged (a stuck netstack pump, a DNS server that no longer answers) fails it,
// so the DaemonSet's liveness probe restarts it. Probes are serialized and a result is reused for
// probeReuse, so a burst of requests costs one round trip.
//
// It serves nothing else: no catalog, no keys.
type health struct {
	srv   *http.Server
	ln    net.Listener
	wg    sync.WaitGroup
	probe func(context.Context) error // nil: no live check

	mu    sync.Mutex // mu guards all following fields
	state string     // "" when ready, else what the agent waits for

	probeMu   sync.Mutex // serializes probes; guards the two fields below
	lastProbe time.Time
	lastErr   error
}

const (
	// probeTimeout bounds one live round trip of /readyz.
	probeTimeout = 2 * time.Second
	// probeReuse is how long the result of a round trip answers later requests.
	probeReuse = time.Second
)

// startHealth listens on addr and serves until close. A listen error is returned at once. With
// withPprof it serves the Go profiler under /debug/pprof/ too.
func startHealth(addr string, withPprof bool) (*health, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("health endpoint: listen %s (set --health-addr to a free address): %w", addr, err)
	}
	h := &health{ln: ln, state: "starting"}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if err := h.ready(r.Context()); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	if withPprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	h.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		_ = h.srv.Serve(ln) // returns http.ErrServerClosed on close
	}()
	return h, nil
}

// Addr is the address it listens on.
func (h *health) Addr() net.Addr { return h.ln.Addr() }

// set records what the agent waits for; "" means ready. probe, when not nil, is the live round
// trip that readiness needs from then on.
func (h *health) set(state string, probe func(context.Context) error) {
	h.mu.Lock()
	h.state = state
	if probe != nil {
		h.probe = probe
	}
	h.mu.Unlock()
}

// ready returns nil when the agent is ready: nothing to wait for, and the live round trip answers.
func (h *health) ready(ctx context.Context) error {
	h.mu.Lock()
	state, probe := h.state, h.probe
	h.mu.Unlock()
	if state != "" {
		return errors.New(state)
	}
	if probe == nil {
		return nil
	}
	h.probeMu.Lock()
	defer h.probeMu.Unlock()
	if !h.lastProbe.IsZero() && time.Since(h.lastProbe) < probeReuse {
		return h.lastErr
	}
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	start := time.Now()
	err := probe(ctx)
	if err != nil {
		err = fmt.Errorf("data path round trip failed after %v: %w", time.Since(start).Round(time.Millisecond), err)
	}
	h.lastProbe, h.lastErr = time.Now(), err
	return err
}

// close stops the server and waits for it.
func (h *health) close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := h.srv.Shutdown(ctx)
	h.wg.Wait()
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}
