package forward

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/edgewire/edgewire/discovery"
)

var (
	loopback4 = netip.MustParseAddr("127.0.0.1")
	loopback6 = netip.MustParseAddr("::1")
)

// allowOnly returns an Allow function that admits exactly the given targets, for any protocol.
func allowOnly(targets ...netip.AddrPort) func(discovery.Protocol, netip.AddrPort) bool {
	return func(_ discovery.Protocol, t netip.AddrPort) bool {
		for _, a := range targets {
			if a == t {
				return true
			}
		}
		return false
	}
}

// startListener starts a Listener on a port free for both TCP and UDP on cfg.Addr (default
// 127.0.0.1) and closes it when the test ends.
func startListener(t testing.TB, cfg ListenerConfig) *Listener {
	t.Helper()
	if !cfg.Addr.IsValid() {
		cfg.Addr = loopback4
	}
	for range 20 {
		cfg.Port = freePort(t, cfg.Addr)
		l, err := NewListener(cfg)
		if err != nil {
			t.Fatalf("NewListener: %v", err)
		}
		err = l.Start()
		if errors.Is(err, syscall.EADDRINUSE) {
			l.Close()
			continue
		}
		if err != nil {
			t.Fatalf("Start: %v", err)
		}
		t.Cleanup(func() { l.Close() })
		return l
	}
	t.Fatal("no free port for TCP and UDP")
	return nil
}

func freePort(t testing.TB, a netip.Addr) uint16 {
	t.Helper()
	ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(a, 0)))
	if err != nil {
		t.Fatalf("free port: %v", err)
	}
	defer ln.Close()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

func dialerFor(l *Listener) *Dialer {
	return &Dialer{Port: l.Addr().Port(), Timeout: 5 * time.Second}
}

// waitFor polls cond until it holds or 5 s have passed.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// tcpTarget is a TCP server standing for an endpoint; it counts the connections it accepts.
type tcpTarget struct {
	ln      *net.TCPListener
	accepts atomic.Int64
	wg      sync.WaitGroup

	mu    sync.Mutex // guards conns
	conns []net.Conn
}

// startTCPTarget serves every connection with handle and stops when the test ends.
func startTCPTarget(t testing.TB, a netip.Addr, handle func(*net.TCPConn)) *tcpTarget {
	t.Helper()
	ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(a, 0)))
	if err != nil {
		t.Fatalf("target: %v", err)
	}
	tg := &tcpTarget{ln: ln}
	tg.wg.Add(1)
	go func() {
		defer tg.wg.Done()
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			tg.accepts.Add(1)
			tg.mu.Lock()
			tg.conns = append(tg.conns, c)
			tg.mu.Unlock()
			tg.wg.Add(1)
			go func() {
				defer tg.wg.Done()
				defer c.Close()
				handle(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		tg.mu.Lock()
		for _, c := range tg.conns {
			c.Close()
		}
		tg.mu.Unlock()
		tg.wg.Wait()
	})
	return tg
}

func (tg *tcpTarget) addr() netip.AddrPort { return tg.ln.Addr().(*net.TCPAddr).AddrPort() }

// echoTCP echoes until EOF, then half-closes.
func echoTCP(c *net.TCPConn) {
	if _, err := io.Copy(c, c); err == nil {
		c.CloseWrite()
	}
}

// udpTarget is a UDP server standing for an endpoint: it answers each datagram with reply(payload)
// and counts the datagrams it receives.
type udpTarget struct {
	pc        *net.UDPConn
	datagrams atomic.Int64
	wg        sync.WaitGroup
}

func startUDPTarget(t testing.TB, a netip.Addr, reply func([]byte) [][]byte) *udpTarget {
	t.Helper()
	pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, 0)))
	if err != nil {
		t.Fatalf("udp target: %v", err)
	}
	tg := &udpTarget{pc: pc}
	tg.wg.Add(1)
	go func() {
		defer tg.wg.Done()
		buf := make([]byte, maxDatagram)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				continue
			}
			tg.datagrams.Add(1)
			for _, r := range reply(buf[:n]) {
				pc.WriteToUDPAddrPort(r, from)
			}
		}
	}()
	t.Cleanup(func() {
		pc.Close()
		tg.wg.Wait()
	})
	return tg
}

func (tg *udpTarget) addr() netip.AddrPort { return tg.pc.LocalAddr().(*net.UDPAddr).AddrPort() }

func echoUDP(p []byte) [][]byte { return [][]byte{append([]byte(nil), p...)} }
