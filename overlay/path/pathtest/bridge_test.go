package pathtest

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// readWithin reads one datagram from c within d.
func readWithin(t *testing.T, c *PacketConn, d time.Duration) (string, netip.AddrPort, bool) {
	t.Helper()
	type got struct {
		b    string
		from netip.AddrPort
	}
	ch := make(chan got, 1)
	go func() {
		buf := make([]byte, 1500)
		n, from, err := c.ReadFrom(buf)
		if err == nil {
			ch <- got{string(buf[:n]), from}
		}
		close(ch)
	}()
	select {
	case g, ok := <-ch:
		return g.b, g.from, ok
	case <-time.After(d):
		c.Close() // ends the reader
		<-ch
		return "", netip.AddrPort{}, false
	}
}

// TestBridge sends through a Bridge to a real UDP service that answers each datagram with the
// address it came from: the answer comes back from the Bridge's address, a source over the limit
// is dropped and counted, and the real address the service saw is an alias of the source.
func TestBridge(t *testing.T) {
	svc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			_, from, err := svc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			_, _ = svc.WriteToUDPAddrPort([]byte(from.String()), from)
		}
	}()
	defer func() {
		svc.Close()
		<-done
	}()
	target := svc.LocalAddr().(*net.UDPAddr).AddrPort()

	n := NewNetwork()
	nat := n.AddNAT(netip.MustParseAddr("203.0.113.1"), Easy)
	br, err := n.NewBridge(netip.MustParseAddrPort("127.0.0.1:7000"), target, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer br.Close()
	inside, err := n.ListenPacket(netip.MustParseAddrPort("10.0.0.1:5000"), nat)
	if err != nil {
		t.Fatal(err)
	}
	defer inside.Close()
	other, err := n.ListenPacket(netip.MustParseAddrPort("198.51.100.9:5000"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()

	if err := inside.WriteTo([]byte("hello"), br.sock.addr); err != nil {
		t.Fatal(err)
	}
	seen, from, ok := readWithin(t, inside, 5*time.Second)
	if !ok {
		t.Fatal("no answer through the bridge")
	}
	if from != br.sock.addr {
		t.Errorf("answer from %s, want the bridge's address %s", from, br.sock.addr)
	}
	real, err := netip.ParseAddrPort(seen)
	if err != nil {
		t.Fatalf("service saw %q: %v", seen, err)
	}

	t.Run("over the limit", func(t *testing.T) {
		before := br.Dropped.Load()
		if err := other.WriteTo([]byte("hello"), br.sock.addr); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for br.Dropped.Load() == before && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if br.Dropped.Load() != before+1 || br.Sources() != 1 {
			t.Errorf("dropped %d, sources %d; want 1 more dropped and 1 source", br.Dropped.Load()-before, br.Sources())
		}
	})

	t.Run("the real address is an alias", func(t *testing.T) {
		// The NAT lets other in only after inside sent to it, as for a punch.
		if err := inside.WriteTo([]byte("open"), other.Addr()); err != nil {
			t.Fatal(err)
		}
		if _, _, ok := readWithin(t, other, 5*time.Second); !ok {
			t.Fatal("other got nothing from inside")
		}
		if err := other.WriteTo([]byte("via alias"), real); err != nil {
			t.Fatal(err)
		}
		got, _, ok := readWithin(t, inside, 5*time.Second)
		if !ok || got != "via alias" {
			t.Errorf("inside got %q (%v), want \"via alias\" sent to the alias %s", got, ok, real)
		}
	})
}
