package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"
)

// Server serves the control protocol on a Unix socket.
type Server struct {
	path    string
	backend Backend
	logger  *slog.Logger

	mu     sync.Mutex // guards all following fields
	srv    *http.Server
	ln     net.Listener
	done   chan struct{}
	closed bool
}

// NewServer returns a server for the socket at path. It starts nothing.
func NewServer(path string, backend Backend, logger *slog.Logger) *Server {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Server{path: path, backend: backend, logger: logger.With("component", "control")}
}

// Start listens on the socket and serves in the background. A stale socket left by an agent that
// died is replaced; a socket that another live agent answers on is an error.
func (s *Server) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return net.ErrClosed
	}
	if err := os.MkdirAll(filepath.Dir(s.path), 0o755); err != nil {
		return fmt.Errorf("control socket %s: %w", s.path, err)
	}
	if c, err := net.DialTimeout("unix", s.path, 200*time.Millisecond); err == nil {
		c.Close()
		return fmt.Errorf("control socket %s: another agent is listening on it (stop it with `meshctl down --control-socket %s`, or pick another --control-socket)", s.path, s.path)
	}
	if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("control socket %s: remove stale socket: %w", s.path, err)
	}
	ln, err := net.Listen("unix", s.path)
	if err != nil {
		return fmt.Errorf("control socket %s: %w", s.path, err)
	}
	if err := os.Chmod(s.path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("control socket %s: chmod: %w", s.path, err)
	}
	s.ln = ln
	s.srv = &http.Server{Handler: s.handler(), ReadHeaderTimeout: 5 * time.Second}
	s.done = make(chan struct{})
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.logger.Error("control socket stopped", "err", err)
		}
	}()
	return nil
}

// Close stops serving, removes the socket and waits. It is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	srv, done := s.srv, s.done
	s.mu.Unlock()
	if srv == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := srv.Shutdown(ctx)
	if err != nil {
		err = errors.Join(err, srv.Close())
	}
	<-done
	if rmErr := os.Remove(s.path); rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) {
		err = errors.Join(err, rmErr)
	}
	return err
}

func (s *Server) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.backend.Status())
	})
	mux.HandleFunc("GET /v1/services", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.backend.Services())
	})
	mux.HandleFunc("GET /v1/resolve", func(w http.ResponseWriter, r *http.Request) {
		name := r.URL.Query().Get("name")
		if name == "" {
			writeError(w, http.StatusBadRequest, errors.New("missing name"))
			return
		}
		qtype := r.URL.Query().Get("type")
		if qtype == "" {
			qtype = "A"
		}
		res, err := s.backend.Resolve(r.Context(), name, qtype)
		if err != nil {
			writeError(w, http.StatusBadRequest, err)
			return
		}
		writeJSON(w, http.StatusOK, res)
	})
	mux.HandleFunc("GET /v1/wireguard", func(w http.ResponseWriter, r *http.Request) {
		wg, err := s.backend.WireGuard()
		if err != nil {
			writeError(w, http.StatusServiceUnavailable, err)
			return
		}
		writeJSON(w, http.StatusOK, wg)
	})
	mux.HandleFunc("POST /v1/ping", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		node := q.Get("node")
		count, err := strconv.Atoi(q.Get("count"))
		if node == "" || err != nil || count < 0 {
			writeError(w, http.StatusBadRequest, errors.New("ping wants node and a count >= 0"))
			return
		}
		untilDirect := q.Get("until-direct") == "true"
		w.Header().Set("Content-Type", "application/x-ndjson")
		flusher, _ := w.(http.Flusher)
		enc := json.NewEncoder(w)
		started := false
		err = s.backend.Ping(r.Context(), node, count, untilDirect, func(res PingResult) {
			started = true
			_ = enc.Encode(res)
			if flusher != nil {
				flusher.Flush()
			}
		})
		if err != nil {
			if !started {
				writeError(w, http.StatusBadRequest, err)
				return
			}
			_ = enc.Encode(PingResult{Node: node, Error: err.Error()})
		}
	})
	mux.HandleFunc("POST /v1/down", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, struct{}{})
		s.backend.Down()
	})
	return mux
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, code int, err error) {
	writeJSON(w, code, map[string]string{"error": err.Error()})
}
