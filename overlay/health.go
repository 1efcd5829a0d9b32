package overlay

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"
)

// health is the agent's HTTP health endpoint (--health-addr), for kubelet probes and load
// balancers:
//
//	GET /healthz  200 "ok" while the agent runs (liveness)
//	GET /readyz   200 "ready" once the catalog is applied and the data plane is up, else 503 with
//	              what it is waiting for (readiness)
//
// It serves nothing else: no catalog, no keys.
type health struct {
	srv *http.Server
	ln  net.Listener
	wg  sync.WaitGroup

	mu    sync.Mutex
	state string // "" when ready, else what the agent waits for
}

// startHealth listens on addr and serves until close. A listen error is returned at once.
func startHealth(addr string) (*health, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("health endpoint: listen %s (set --health-addr to a free address): %w", addr, err)
	}
	h := &health{ln: ln, state: "starting"}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		h.mu.Lock()
		state := h.state
		h.mu.Unlock()
		if state != "" {
			http.Error(w, "not ready: "+state, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
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

// set records what the agent waits for; "" means ready.
func (h *health) set(state string) {
	h.mu.Lock()
	h.state = state
	h.mu.Unlock()
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
