package forward

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/edgewire/edgewire/discovery"
)

// fakeEarly is an EarlyData over a byte slice the test appends to, standing for the netstack's
// receive buffer.
type fakeEarly struct {
	mu       sync.Mutex
	data     []byte
	eof      bool
	more     chan struct{} // a token when data grew or eof was set
	consumed int
}

func newFakeEarly(data []byte) *fakeEarly {
	return &fakeEarly{data: data, more: make(chan struct{}, 1)}
}

func (f *fakeEarly) add(p []byte, eof bool) {
	f.mu.Lock()
	f.data = append(f.data, p...)
	f.eof = f.eof || eof
	f.mu.Unlock()
	select {
	case f.more <- struct{}{}:
	default:
	}
}

func (f *fakeEarly) Peek(ctx context.Context, off int, p []byte) (int, error) {
	for {
		f.mu.Lock()
		if off < len(f.data) {
			n := copy(p, f.data[off:])
			f.mu.Unlock()
			return n, nil
		}
		eof := f.eof
		f.mu.Unlock()
		if eof {
			return 0, io.EOF
		}
		select {
		case <-f.more:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

func (f *fakeEarly) Consume(n int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if n > len(f.data) {
		return errors.New("consume past the data")
	}
	f.data = f.data[n:]
	f.consumed += n
	return nil
}

// readN reads exactly n bytes from c within 5 s.
func readN(t *testing.T, c net.Conn, n int) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, n)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("read %d bytes: %v", n, err)
	}
	return buf
}

func TestDialEarlyData(t *testing.T) {
	big := bytes.Repeat([]byte("0123456789abcdef"), (MaxEarly+5000)/16)
	for _, tc := range []struct {
		name     string
		data     []byte
		eof      bool
		wantSent int
	}{
		{"request", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), false, 27},
		{"request then the client's FIN", []byte("PING"), true, 4},
		{"nothing yet", nil, false, 0},
		{"more than MaxEarly", big, false, MaxEarly},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tg := startTCPTarget(t, loopback4, echoTCP)
			l := startListener(t, ListenerConfig{Allow: allowOnly(tg.addr())})
			early := newFakeEarly(tc.data)
			if tc.eof {
				early.add(nil, true)
			}
			d := dialerFor(l)
			conn, err := d.Dial(WithEarlyData(context.Background(), early), discovery.TCP, loopback4, tg.addr())
			if err != nil {
				t.Fatalf("Dial: %v", err)
			}
			defer conn.Close()
			if early.consumed != tc.wantSent {
				t.Fatalf("consumed %d early bytes, want %d", early.consumed, tc.wantSent)
			}
			// The caller sends what was not consumed, then more: the target sees every byte once.
			rest := append(append([]byte(nil), early.data...), "-and-then"...)
			if _, err := conn.Write(rest); err != nil {
				t.Fatalf("write: %v", err)
			}
			want := append(append([]byte(nil), tc.data...), "-and-then"...)
			if got := readN(t, conn, len(want)); !bytes.Equal(got, want) {
				t.Fatalf("echo: %d bytes, differs from the %d sent", len(got), len(want))
			}
			wantEarly := uint64(0)
			if tc.wantSent > 0 {
				wantEarly = 1
			}
			if st := d.Stats(); st.EarlyDials != wantEarly {
				t.Fatalf("EarlyDials = %d, want %d", st.EarlyDials, wantEarly)
			}
		})
	}
}

// TestDialEarlyDataArrivesLate: bytes the client sends while the status is on its way go early too.
func TestDialEarlyDataArrivesLate(t *testing.T) {
	// The listener holds the status back until the test, told that the header has arrived, has
	// added the client's bytes.
	headerIn, release := make(chan struct{}), make(chan struct{})
	tg := startTCPTarget(t, loopback4, echoTCP)
	l := startListener(t, ListenerConfig{Allow: func(p discovery.Protocol, a netip.AddrPort) bool {
		close(headerIn)
		<-release
		return a == tg.addr()
	}})
	early := newFakeEarly(nil)
	go func() {
		<-headerIn
		early.add([]byte("late"), false)
		close(release)
	}()
	conn, err := dialerFor(l).Dial(WithEarlyData(context.Background(), early), discovery.TCP, loopback4, tg.addr())
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	defer conn.Close()
	if early.consumed != 4 {
		t.Fatalf("consumed %d, want the 4 late bytes", early.consumed)
	}
	if got := readN(t, conn, 4); string(got) != "late" {
		t.Fatalf("echo %q, want %q", got, "late")
	}
}

// TestDialEarlyDataRefused: a refused attempt consumes nothing, so the next one (another endpoint)
// sends the same bytes, and the refused target never sees them.
func TestDialEarlyDataRefused(t *testing.T) {
	good := startTCPTarget(t, loopback4, echoTCP)
	forbidden := startTCPTarget(t, loopback4, echoTCP)
	down := netip.AddrPortFrom(loopback4, freePort(t, loopback4))
	l := startListener(t, ListenerConfig{Allow: allowOnly(good.addr(), down)})
	d := dialerFor(l)
	early := newFakeEarly([]byte("hello"))
	ctx := WithEarlyData(context.Background(), early)
	for _, tc := range []struct {
		name   string
		target netip.AddrPort
		want   error
	}{
		{"not allowed", forbidden.addr(), ErrRefused},
		{"target down", down, ErrDialFailed},
	} {
		c, err := d.Dial(ctx, discovery.TCP, loopback4, tc.target)
		if !errors.Is(err, tc.want) {
			if c != nil {
				c.Close()
			}
			t.Fatalf("%s: Dial = %v, want %v", tc.name, err, tc.want)
		}
		if early.consumed != 0 {
			t.Fatalf("%s: consumed %d bytes of a refused attempt", tc.name, early.consumed)
		}
	}
	conn, err := d.Dial(ctx, discovery.TCP, loopback4, good.addr())
	if err != nil {
		t.Fatalf("Dial good target: %v", err)
	}
	defer conn.Close()
	if got := readN(t, conn, 5); string(got) != "hello" {
		t.Fatalf("echo %q, want %q", got, "hello")
	}
	if n := forbidden.accepts.Load(); n != 0 {
		t.Fatalf("the refused target saw %d connections", n)
	}
}
