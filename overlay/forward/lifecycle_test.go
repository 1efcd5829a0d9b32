package forward

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/internal/flows"
)

func TestNewListenerValidates(t *testing.T) {
	allow := allowOnly()
	tests := []struct {
		name string
		cfg  ListenerConfig
	}{
		{"no address", ListenerConfig{Allow: allow}},
		{"unspecified address", ListenerConfig{Addr: netip.IPv6Unspecified(), Allow: allow}},
		{"no allow", ListenerConfig{Addr: loopback4}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if l, err := NewListener(tc.cfg); err == nil {
				l.Close()
				t.Fatal("NewListener accepted the config")
			}
		})
	}
}

func TestListenerDefaults(t *testing.T) {
	l, err := NewListener(ListenerConfig{Addr: loopback4, Allow: allowOnly()})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if l.Addr().Port() != DefaultPort {
		t.Fatalf("port %d, want %d", l.Addr().Port(), DefaultPort)
	}
	c := l.cfg
	if c.DialTimeout != DefaultListenDialTimeout || c.UDPIdleTimeout != DefaultUDPIdleTimeout ||
		c.HeaderTimeout != DefaultHeaderTimeout {
		t.Fatalf("defaults not applied: %+v", c)
	}
	fds := flows.FDLimit()
	if c.MaxTCPFlows != DefaultMaxTCPFlows(fds) || c.MaxTCPFlowsPerPeer != c.MaxTCPFlows/2 ||
		c.MaxUDPFlows != DefaultMaxUDPFlows(fds) || c.MaxUDPFlowsPerPeer != c.MaxUDPFlows/2 ||
		c.UDPEvictIdle != DefaultUDPIdleTimeout/4 {
		t.Fatalf("flow caps not applied for a file limit of %d: %+v", fds, c)
	}
}

func TestListenerLifecycle(t *testing.T) {
	t.Run("close before start", func(t *testing.T) {
		l, err := NewListener(ListenerConfig{Addr: loopback4, Allow: allowOnly()})
		if err != nil {
			t.Fatal(err)
		}
		for range 2 {
			if err := l.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
		}
		if err := l.Start(); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Start after Close = %v, want net.ErrClosed", err)
		}
	})
	t.Run("start twice", func(t *testing.T) {
		l := startListener(t, ListenerConfig{Allow: allowOnly()})
		if err := l.Start(); err == nil {
			t.Fatal("second Start succeeded")
		}
	})
	t.Run("close with flows open", func(t *testing.T) {
		tcpTarget := startTCPTarget(t, loopback4, echoTCP)
		udpTarget := startUDPTarget(t, loopback4, echoUDP)
		silent := startTCPTarget(t, loopback4, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
		l := startListener(t, ListenerConfig{Allow: allowOnly(tcpTarget.addr(), udpTarget.addr(), silent.addr())})
		d := dialerFor(l)

		tc, err := d.Dial(context.Background(), discovery.TCP, loopback4, tcpTarget.addr())
		if err != nil {
			t.Fatal(err)
		}
		defer tc.Close()
		sc, err := d.Dial(context.Background(), discovery.TCP, loopback4, silent.addr())
		if err != nil {
			t.Fatal(err)
		}
		defer sc.Close()
		uc, err := d.Dial(context.Background(), discovery.UDP, loopback4, udpTarget.addr())
		if err != nil {
			t.Fatal(err)
		}
		defer uc.Close()
		if _, err := uc.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		readDatagram(t, uc)
		// A raw client that never sends its header.
		idle, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(l.Addr()))
		if err != nil {
			t.Fatal(err)
		}
		defer idle.Close()
		waitFor(t, "flows to open", func() bool {
			st := l.Stats()
			return st.ActiveTCP == 2 && st.ActiveUDP == 1
		})

		// Concurrent Closes all return after every goroutine ended (goleak checks at exit).
		var wg sync.WaitGroup
		for range 3 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := l.Close(); err != nil {
					t.Errorf("Close: %v", err)
				}
			}()
		}
		wg.Wait()
		if st := l.Stats(); st.ActiveTCP != 0 || st.ActiveUDP != 0 {
			t.Fatalf("after Close: stats %+v", st)
		}
		// The client sees its TCP flows end.
		tc.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadAll(tc); err != nil && !isReset(err) {
			t.Fatalf("read after Close: %v", err)
		}
		if err := l.Close(); err != nil {
			t.Fatalf("Close again: %v", err)
		}
	})
}

func isReset(err error) bool {
	var oe *net.OpError
	return errors.As(err, &oe) && !oe.Timeout()
}
