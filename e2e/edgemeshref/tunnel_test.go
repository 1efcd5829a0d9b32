package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	libp2ptls "github.com/libp2p/go-libp2p/p2p/security/tls"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// testTunnel is a server and a client host on loopback, connected, and an echo server as target.
type testTunnel struct {
	server, client host.Host
	echo           netip.AddrPort
}

func newTestTunnel(t *testing.T) *testTunnel {
	t.Helper()
	log := slog.New(slog.DiscardHandler)
	newKey := func() crypto.PrivKey {
		priv, _, err := crypto.GenerateEd25519Key(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return priv
	}
	addr, err := tcpMultiaddr(netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := newHost(newKey(), addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	srv.SetStreamHandler(ProtocolID, (&server{log: log}).handle)
	cli, err := newHost(newKey())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := connect(ctx, cli, peer.AddrInfo{ID: srv.ID(), Addrs: srv.Addrs()}); err != nil {
		t.Fatal(err)
	}
	// EdgeMesh's data path: one TCP connection secured by TLS, streams multiplexed by yamux.
	conns := cli.Network().ConnsToPeer(srv.ID())
	if len(conns) != 1 {
		t.Fatalf("%d connections to the server, want 1", len(conns))
	}
	if cs := conns[0].ConnState(); cs.Security != libp2ptls.ID || cs.StreamMultiplexer != yamux.ID || cs.Transport != "tcp" {
		t.Fatalf("connection is %s/%s/%s, want tcp/%s/%s", cs.Transport, cs.Security, cs.StreamMultiplexer, libp2ptls.ID, yamux.ID)
	}
	return &testTunnel{server: srv, client: cli, echo: startEcho(t)}
}

// startEcho runs a TCP echo server on loopback that closes a connection once its client has
// half-closed and everything is echoed.
func startEcho(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				io.Copy(c, c)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// startClient runs the client's accept loop towards target on a loopback listener and returns its
// address.
func (tt *testTunnel) startClient(t *testing.T, target netip.AddrPort) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &client{log: slog.New(slog.DiscardHandler), host: tt.client, peer: tt.server.ID()}
	done := make(chan error, 1)
	go func() { done <- c.serve(context.Background(), ln, target) }()
	t.Cleanup(func() {
		ln.Close()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
		c.wg.Wait()
	})
	return ln.Addr().String()
}

func TestTunnelRoundTrip(t *testing.T) {
	tt := newTestTunnel(t)
	addr := tt.startClient(t, tt.echo)
	for _, tc := range []struct {
		name string
		size int
	}{
		{name: "one byte", size: 1},
		{name: "4 MiB", size: 4 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := make([]byte, tc.size)
			rand.Read(want)
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(20 * time.Second))
			// Write concurrently with the read: the echo sends back while it receives.
			werr := make(chan error, 1)
			go func() {
				_, err := c.Write(want)
				if err == nil {
					// The half-close travels through the tunnel; the echo server's close comes back
					// as the EOF that ends ReadAll.
					err = c.(*net.TCPConn).CloseWrite()
				}
				werr <- err
			}()
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("read: %v", err)
			}
			if err := <-werr; err != nil {
				t.Fatalf("write: %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("got %d bytes back, want the %d sent", len(got), len(want))
			}
		})
	}
	if n := len(tt.client.Network().ConnsToPeer(tt.server.ID())); n != 1 {
		t.Errorf("%d libp2p connections to the server after the tunnels, want the one", n)
	}
}

func TestTunnelRefusals(t *testing.T) {
	tt := newTestTunnel(t)
	// A port nothing listens on: take one and free it.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()

	for _, tc := range []struct {
		name   string
		header []byte
		want   status
	}{
		{name: "wrong version", header: []byte{2, 14, '1', '2', '7', '.', '0', '.', '0', '.', '1', ':', '7', '0', '0', '0'}, want: statusBadHeader},
		{name: "empty target", header: []byte{headerVersion, 0}, want: statusBadHeader},
		{name: "name, not an address", header: append([]byte{headerVersion, 14}, "example.com:80"...), want: statusBadHeader},
		{name: "no port", header: append([]byte{headerVersion, 9}, "127.0.0.1"...), want: statusBadHeader},
		{name: "nothing listens", header: appendHeader(nil, closed), want: statusDialFailed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			st, err := tt.client.NewStream(ctx, tt.server.ID(), ProtocolID)
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			st.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := st.Write(tc.header); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(st)
			if err != nil {
				t.Fatalf("read answer: %v", err)
			}
			if len(got) != 1 || status(got[0]) != tc.want {
				t.Fatalf("answer %v, want [%d] (%s) then the end of the stream", got, tc.want, tc.want)
			}
		})
	}

	t.Run("client connection closed on refusal", func(t *testing.T) {
		c, err := net.Dial("tcp", tt.startClient(t, closed))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(c)
		if err != nil && !strings.Contains(err.Error(), "reset") {
			t.Fatalf("read: %v", err)
		}
		if len(got) != 0 {
			t.Fatalf("read %q from a refused tunnel", got)
		}
	})
}

func TestHeaderRoundTrip(t *testing.T) {
	for _, s := range []string{"10.244.1.10:5201", "[fd00::1]:7000"} {
		ap := netip.MustParseAddrPort(s)
		got, err := readHeader(bytes.NewReader(appendHeader(nil, ap)))
		if err != nil || got != ap {
			t.Errorf("%s: read back %v, %v", s, got, err)
		}
	}
}
