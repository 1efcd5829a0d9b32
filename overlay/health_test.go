package overlay

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func TestHealthReadiness(t *testing.T) {
	h, err := startHealth("127.0.0.1:0", false)
	if err != nil {
		t.Fatal(err)
	}
	defer h.close()
	base := "http://" + h.Addr().String()

	if code, body := get(t, base+"/healthz"); code != 200 || strings.TrimSpace(body) != "ok" {
		t.Errorf("/healthz = %d %q", code, body)
	}
	h.set("waiting for the first catalog", nil)
	if code, body := get(t, base+"/readyz"); code != 503 || !strings.Contains(body, "first catalog") {
		t.Errorf("/readyz before the catalog = %d %q, want 503 naming what it waits for", code, body)
	}

	var calls atomic.Int32
	var fail atomic.Bool
	h.set("", func(ctx context.Context) error {
		calls.Add(1)
		if fail.Load() {
			return errors.New("i/o timeout")
		}
		return nil
	})
	if code, body := get(t, base+"/readyz"); code != 200 || strings.TrimSpace(body) != "ready" {
		t.Errorf("/readyz with a working round trip = %d %q", code, body)
	}
	// Within probeReuse the result is reused: a burst of probes costs one round trip.
	for range 5 {
		get(t, base+"/readyz")
	}
	if n := calls.Load(); n != 1 {
		t.Errorf("%d round trips for 6 requests within %v, want 1", n, probeReuse)
	}

	// A wedged data path fails readiness (forget the last result rather than wait out probeReuse).
	fail.Store(true)
	h.probeMu.Lock()
	h.lastProbe = h.lastProbe.Add(-probeReuse)
	h.probeMu.Unlock()
	if code, body := get(t, base+"/readyz"); code != 503 || !strings.Contains(body, "round trip failed") || !strings.Contains(body, "i/o timeout") {
		t.Errorf("/readyz with a failing round trip = %d %q, want 503 with the cause", code, body)
	}
	if code, _ := get(t, base+"/healthz"); code != 200 {
		t.Errorf("/healthz = %d while the round trip fails: liveness of the HTTP server only", code)
	}
}

func TestHealthPprof(t *testing.T) {
	tests := []struct {
		name  string
		pprof bool
		want  int
	}{
		{name: "off by default", pprof: false, want: 404},
		{name: "on with --pprof", pprof: true, want: 200},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h, err := startHealth("127.0.0.1:0", tc.pprof)
			if err != nil {
				t.Fatal(err)
			}
			defer h.close()
			code, body := get(t, "http://"+h.Addr().String()+"/debug/pprof/goroutine?debug=1")
			if code != tc.want {
				t.Errorf("/debug/pprof/goroutine = %d, want %d", code, tc.want)
			}
			if tc.pprof && !strings.Contains(body, "goroutine profile: total") {
				t.Errorf("profile body %.80q", body)
			}
		})
	}
}
