package proxy_test

import (
	"context"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/proxy"
)

// namedEndpoint is a ready endpoint at addr whose port "web" is port.
func namedEndpoint(addr netip.AddrPort) discovery.Endpoint {
	e := ep("local", addr.Addr().String())
	e.Ports = []discovery.EndpointPort{{Name: "web", Protocol: discovery.TCP, Port: addr.Port()}, {Name: "web", Protocol: discovery.UDP, Port: addr.Port()}}
	return e
}

// namedService is a service at svcIP with TCP and UDP port 80 targeting the endpoints' port "web".
func namedService(eps ...discovery.Endpoint) *discovery.Service {
	return &discovery.Service{
		Namespace: "default",
		Name:      "real",
		IP:        svcIP,
		Ports: []discovery.ServicePort{
			{Name: "tcp", Protocol: discovery.TCP, Port: 80, TargetPortName: "web"},
			{Name: "udp", Protocol: discovery.UDP, Port: 80, TargetPortName: "web"},
		},
		Endpoints: eps,
	}
}

// TestKernelDialerTCP dials real loopback listeners with the default dialer: the first endpoint's
// port is closed (refused), so the flow must land on the live one.
func TestKernelDialerTCP(t *testing.T) {
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	closedAddr := closed.Addr().(*net.TCPAddr).AddrPort()
	closed.Close()

	live, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	liveAddr := live.Addr().(*net.TCPAddr).AddrPort()
	var wg sync.WaitGroup
	defer wg.Wait() // after live.Close, deferred below, ends the accept loop
	defer live.Close()
	wg.Go(func() {
		for {
			c, err := live.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				io.Copy(c, c) // echo until the client closes
			})
		}
	})

	p := proxy.New(proxy.Config{})
	p.Update(snapshot(namedService(namedEndpoint(closedAddr), namedEndpoint(liveAddr))))

	cases := []struct {
		name    string
		retries uint64 // Stats().Retries after the flow
	}{
		{"refused endpoint retried to the live one", 1},
		{"refused endpoint ejected and skipped", 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			conn, err := p.DialFlow(ctx, discovery.TCP, client, httpDst)
			if err != nil {
				t.Fatalf("DialFlow: %v", err)
			}
			defer conn.Close()
			if got := conn.RemoteAddr().(*net.TCPAddr).AddrPort(); got != liveAddr {
				t.Fatalf("connected to %s, want %s", got, liveAddr)
			}
			echo(t, conn)
			if st := p.Stats(); st.Retries != tc.retries || st.DialFailures != 1 {
				t.Errorf("stats %+v, want %d retries and the one refusal", st, tc.retries)
			}
		})
	}
}

// TestKernelDialerUDP sends a datagram through a flow to a real loopback UDP echo server.
func TestKernelDialerUDP(t *testing.T) {
	srv, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	var wg sync.WaitGroup
	defer wg.Wait() // after srv.Close, deferred below, ends the echo loop
	defer srv.Close()
	wg.Go(func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := srv.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			srv.WriteToUDPAddrPort(buf[:n], from)
		}
	})

	p := proxy.New(proxy.Config{})
	p.Update(snapshot(namedService(namedEndpoint(srv.LocalAddr().(*net.UDPAddr).AddrPort()))))

	for _, tc := range []struct {
		name string
		src  netip.AddrPort
	}{
		{"first flow", client},
		{"second flow", netip.MustParseAddrPort("10.0.0.2:5353")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			conn, err := p.DialFlow(ctx, discovery.UDP, tc.src, httpDst)
			if err != nil {
				t.Fatalf("DialFlow: %v", err)
			}
			defer conn.Close()
			if _, ok := conn.(*net.UDPConn); !ok {
				t.Fatalf("flow conn is %T, want a connected *net.UDPConn", conn)
			}
			echo(t, conn)
		})
	}
}

// echo writes a message and expects it back.
func echo(t *testing.T, conn net.Conn) {
	t.Helper()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	msg := []byte("hello edgewire")
	if _, err := conn.Write(msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, 64)
	n, err := io.ReadAtLeast(conn, buf, len(msg))
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if string(buf[:n]) != string(msg) {
		t.Fatalf("read %q, want %q", buf[:n], msg)
	}
}
