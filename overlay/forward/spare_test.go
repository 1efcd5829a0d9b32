package forward

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/edgewire/edgewire/discovery"
)

// roundTrip dials target through d and checks that the flow echoes.
func roundTrip(t *testing.T, d *Dialer, l *Listener, tg *tcpTarget) {
	t.Helper()
	conn, err := d.Dial(context.Background(), discovery.TCP, l.Addr().Addr(), tg.addr())
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte("ping")); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo: %q, %v", buf, err)
	}
}

func TestDialerSpares(t *testing.T) {
	tg := startTCPTarget(t, loopback4, echoTCP)
	l := startListener(t, ListenerConfig{Allow: allowOnly(tg.addr())})
	d := dialerFor(l)
	d.Spares = 2
	d.SpareMaxAge = time.Minute
	defer d.Close()

	roundTrip(t, d, l, tg)
	if st := d.Stats(); st.FreshDials != 1 || st.SpareDials != 0 {
		t.Fatalf("first Dial: stats %+v, want 1 fresh dial (no spare yet)", st)
	}
	waitFor(t, "2 spares", func() bool { return d.Stats().Spares == 2 })
	for range 3 {
		roundTrip(t, d, l, tg)
		waitFor(t, "spares refilled", func() bool { return d.Stats().Spares == 2 })
	}
	if st := d.Stats(); st.FreshDials != 1 || st.SpareDials != 3 || st.DeadSpares != 0 {
		t.Fatalf("stats %+v, want 1 fresh and 3 spare dials", st)
	}
	if err := d.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if st := d.Stats(); st.Spares != 0 {
		t.Fatalf("after Close: %d spares, want 0", st.Spares)
	}
	// The Listener sees the closed spares as unused connections, not bad requests.
	waitFor(t, "listener to count 2 unused", func() bool { return l.Stats().Unused == 2 })
	if st := l.Stats(); st.BadHeader != 0 || st.TCPAccepted != 4 {
		t.Fatalf("listener stats %+v, want 4 accepted, no bad header", st)
	}
	// A closed Dialer still dials, without spares.
	roundTrip(t, d, l, tg)
	if st := d.Stats(); st.Spares != 0 || st.FreshDials != 2 {
		t.Fatalf("after Close and a Dial: stats %+v, want no spares, 2 fresh dials", st)
	}
}

func TestDialerSparesExpire(t *testing.T) {
	tg := startTCPTarget(t, loopback4, echoTCP)
	l := startListener(t, ListenerConfig{Allow: allowOnly(tg.addr())})
	d := dialerFor(l)
	d.Spares = 1
	d.SpareMaxAge = 100 * time.Millisecond
	defer d.Close()

	roundTrip(t, d, l, tg)
	waitFor(t, "a spare", func() bool { return d.Stats().Spares == 1 })
	// Nobody dials: the spare is closed once it is SpareMaxAge old, and not replaced.
	waitFor(t, "the spare to expire", func() bool { return d.Stats().Spares == 0 })
	waitFor(t, "listener to count it unused", func() bool { return l.Stats().Unused == 1 })
	d.mu.Lock()
	pooled := len(d.pool)
	d.mu.Unlock()
	if pooled != 0 {
		t.Fatalf("%d servers still pooled after the spares expired, want 0", pooled)
	}
}

func TestDialerDeadSpare(t *testing.T) {
	tg := startTCPTarget(t, loopback4, echoTCP)
	l := startListener(t, ListenerConfig{Allow: allowOnly(tg.addr()), HeaderTimeout: 100 * time.Millisecond})
	d := dialerFor(l)
	d.Spares = 1
	d.SpareMaxAge = time.Minute // longer than the Listener's HeaderTimeout: it closes the spare first
	defer d.Close()

	roundTrip(t, d, l, tg)
	waitFor(t, "a spare", func() bool { return d.Stats().Spares == 1 })
	waitFor(t, "the listener to time the spare out", func() bool { return l.Stats().BadHeader == 1 })
	roundTrip(t, d, l, tg)
	if st := d.Stats(); st.DeadSpares != 1 || st.FreshDials != 2 {
		t.Fatalf("stats %+v, want the dead spare found and a fresh dial instead", st)
	}
}

func TestDialerSpareRefused(t *testing.T) {
	tg := startTCPTarget(t, loopback4, echoTCP)
	l := startListener(t, ListenerConfig{Allow: allowOnly(tg.addr())})
	d := dialerFor(l)
	d.Spares = 1
	d.SpareMaxAge = time.Minute
	defer d.Close()

	roundTrip(t, d, l, tg)
	waitFor(t, "a spare", func() bool { return d.Stats().Spares == 1 })
	// A refusal over a spare is the target's answer: no second try on a fresh connection.
	other := startTCPTarget(t, loopback4, echoTCP)
	_, err := d.Dial(context.Background(), discovery.TCP, l.Addr().Addr(), other.addr())
	if !errors.Is(err, ErrRefused) {
		t.Fatalf("Dial of a target not allowed: %v, want ErrRefused", err)
	}
	if st := d.Stats(); st.FreshDials != 1 || st.SpareDials != 1 {
		t.Fatalf("stats %+v, want the refusal through the spare only", st)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("refusal reported as a timeout: %v", err)
	}
}
