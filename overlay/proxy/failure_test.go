package proxy_test

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/proxy"
	"github.com/edgewire/edgewire/overlay/proxy/proxytest"
)

// dialled returns the addresses of the recorded dials.
func dialled(d *proxytest.Dialer) []netip.AddrPort {
	var out []netip.AddrPort
	for _, x := range d.Dials() {
		out = append(out, x.Addr)
	}
	return out
}

// target returns the status of endpoint address:port addr of the first service.
func target(t *testing.T, p *proxy.Proxy, addr netip.AddrPort) proxy.TargetStatus {
	t.Helper()
	for _, e := range p.Services()[0].Endpoints {
		for _, ts := range e.Targets {
			if ts.Address == addr {
				return ts
			}
		}
	}
	t.Fatalf("no target %s in Services()", addr)
	return proxy.TargetStatus{}
}

func TestFailoverAndBackoff(t *testing.T) {
	cfg := proxy.Config{EjectBase: time.Second, EjectMax: 4 * time.Second}
	p, d, clk := newProxy(t, cfg, service(threeEndpoints()...))
	d.Set(e0, proxytest.Refuse)

	t.Run("failed endpoint retried to the next in the same flow", func(t *testing.T) {
		if got := dial(t, p, client, httpDst); got != e1 {
			t.Fatalf("reached %s, want %s", got, e1)
		}
		if got, want := dialled(d), []netip.AddrPort{e0, e1}; !slices.Equal(got, want) {
			t.Fatalf("dialled %v, want %v", got, want)
		}
		if st := p.Stats(); st.OK != 1 || st.Retries != 1 || st.DialFailures != 1 || st.Failed != 0 {
			t.Errorf("stats %+v", st)
		}
	})
	t.Run("ejected endpoint skipped by next flows", func(t *testing.T) {
		for range 6 {
			dial(t, p, client, httpDst)
		}
		if got := dialled(d); slices.Contains(got, e0) {
			t.Fatalf("dialled %v, ejected %s among them", got, e0)
		}
	})

	// Each time the ejection ends, the next flow that starts at e0 fails again and doubles it.
	for _, tc := range []struct {
		name     string
		failures int
		ejection time.Duration
	}{
		{"first failure", 1, time.Second},
		{"back-off doubles", 2, 2 * time.Second},
		{"doubles again", 3, 4 * time.Second},
		{"capped at EjectMax", 4, 4 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.failures > 1 {
				clk.Advance(target(t, p, e0).EjectedUntil.Sub(clk.Now()))
				dialUntil(t, p, d, e0)
			}
			ts := target(t, p, e0)
			if ts.Failures != tc.failures || !ts.EjectedUntil.Equal(clk.Now().Add(tc.ejection)) {
				t.Fatalf("status %+v, want %d failures, ejected until now+%s", ts, tc.failures, tc.ejection)
			}
		})
	}

	t.Run("success resets", func(t *testing.T) {
		d.Set(e0, proxytest.Answer)
		clk.Advance(4 * time.Second)
		dialUntil(t, p, d, e0)
		if ts := target(t, p, e0); ts.Failures != 0 || !ts.EjectedUntil.IsZero() {
			t.Fatalf("status %+v after a success, want no failures and no ejection", ts)
		}
		d.Set(e0, proxytest.Refuse)
		dialUntil(t, p, d, e0)
		if ts := target(t, p, e0); ts.Failures != 1 || !ts.EjectedUntil.Equal(clk.Now().Add(time.Second)) {
			t.Fatalf("status %+v, want the back-off to start again at 1s", ts)
		}
	})

	t.Run("ejection survives Update", func(t *testing.T) {
		p.Update(snapshot(reversed(service(threeEndpoints()...))))
		for range 6 {
			dial(t, p, client, httpDst)
		}
		if got := dialled(d); slices.Contains(got, e0) {
			t.Fatalf("dialled %v after Update, ejected %s among them", got, e0)
		}
		if ts := target(t, p, e0); ts.Failures != 1 {
			t.Errorf("status %+v after Update, want the failure kept", ts)
		}
	})
}

// dialUntil runs flows until one dials addr (at most one round of the rotation and one more).
func dialUntil(t *testing.T, p *proxy.Proxy, d *proxytest.Dialer, addr netip.AddrPort) {
	t.Helper()
	d.Dials()
	for range 4 {
		if _, err := p.DialFlow(context.Background(), discovery.TCP, client, httpDst); err != nil {
			t.Fatalf("DialFlow: %v", err)
		}
		if slices.Contains(dialled(d), addr) {
			return
		}
	}
	t.Fatalf("no flow dialled %s", addr)
}

func TestAllEjectedStillTried(t *testing.T) {
	p, d, _ := newProxy(t, proxy.Config{}, service(ep("n1", "10.1.0.1"), ep("n2", "10.1.0.2")))
	d.Set(e0, proxytest.Refuse)
	d.Set(e1, proxytest.Refuse)

	for _, name := range []string{"all fail", "all ejected, all tried again"} {
		t.Run(name, func(t *testing.T) {
			_, err := p.DialFlow(context.Background(), discovery.TCP, client, httpDst)
			if !errors.Is(err, proxy.ErrDialFailed) || !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("DialFlow: %v, want ErrDialFailed wrapping ECONNREFUSED", err)
			}
			if got := dialled(d); len(got) != 2 {
				t.Fatalf("dialled %v, want both endpoints", got)
			}
		})
	}
	t.Run("ejected endpoint that answers is used", func(t *testing.T) {
		d.Set(e1, proxytest.Answer)
		if got := dial(t, p, client, httpDst); got != e1 {
			t.Fatalf("reached %s, want %s", got, e1)
		}
	})
	if st := p.Stats(); st.Failed != 2 || st.OK != 1 || st.NoEndpoints != 0 {
		t.Errorf("stats %+v, want 2 failed flows, 1 ok", st)
	}
}

func TestAttemptBounds(t *testing.T) {
	cases := []struct {
		name     string
		attempt  time.Duration
		deadline time.Duration
		blackEP  []netip.AddrPort
		cancel   bool
		want     netip.AddrPort // reached, or invalid for an error
		wantErr  error
		ejected  bool // whether e0 ends up ejected
	}{
		{name: "black hole bounded by attempt timeout", attempt: 20 * time.Millisecond, deadline: time.Minute,
			blackEP: []netip.AddrPort{e0}, want: e1, ejected: true},
		{name: "attempt bounded by deadline", attempt: time.Hour, deadline: 50 * time.Millisecond,
			blackEP: []netip.AddrPort{e0, e1}, wantErr: context.DeadlineExceeded, ejected: true},
		{name: "cancelled flow ejects nothing", attempt: time.Hour, deadline: time.Minute, cancel: true,
			wantErr: context.Canceled},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, d, _ := newProxy(t, proxy.Config{AttemptTimeout: tc.attempt}, service(ep("n1", "10.1.0.1"), ep("n2", "10.1.0.2")))
			for _, a := range tc.blackEP {
				d.Set(a, proxytest.BlackHole)
			}
			ctx, cancel := context.WithTimeout(context.Background(), tc.deadline)
			defer cancel()
			if tc.cancel {
				cancel()
			}
			start := time.Now()
			conn, err := p.DialFlow(ctx, discovery.TCP, client, httpDst)
			if elapsed := time.Since(start); elapsed > tc.deadline/2 && tc.want.IsValid() {
				t.Errorf("flow took %s, the black hole ate the deadline", elapsed)
			}
			switch {
			case tc.wantErr != nil:
				if !errors.Is(err, tc.wantErr) || !errors.Is(err, proxy.ErrDialFailed) {
					t.Fatalf("DialFlow: %v, want ErrDialFailed wrapping %v", err, tc.wantErr)
				}
			case err != nil:
				t.Fatalf("DialFlow: %v", err)
			default:
				if got := conn.(*proxytest.Conn).Remote; got != tc.want {
					t.Fatalf("reached %s, want %s", got, tc.want)
				}
			}
			if ejected := !target(t, p, e0).EjectedUntil.IsZero(); ejected != tc.ejected {
				t.Errorf("e0 ejected %v, want %v", ejected, tc.ejected)
			}
		})
	}
}
