package flows

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// tcpPair returns the two ends of a loopback TCP connection, closed when the test ends.
func tcpPair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan *net.TCPConn, 1)
	go func() {
		c, err := ln.AcceptTCP()
		if err != nil {
			accepted <- nil
			return
		}
		accepted <- c
	}()
	client, err = net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() {
		client.Close()
		server.Close()
	})
	return client, server
}

// waitFor polls cond until it holds or 5 s have passed.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func TestCopy(t *testing.T) {
	tests := []struct {
		name string
		// end ends the source side after the data: its error must come out of Copy.
		end        func(src *net.TCPConn) error
		withWaiter bool
		wantErr    bool
	}{
		{"end of stream returns nil", (*net.TCPConn).CloseWrite, true, false},
		{"end of stream without a waiter", (*net.TCPConn).CloseWrite, false, false},
		{"a reset is an error", func(c *net.TCPConn) error {
			c.SetLinger(0)
			return c.Close()
		}, true, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// peer writes into src; Copy copies src to dst; sink reads dst's other end.
			peer, src := tcpPair(t)
			dst, sink := tcpPair(t)
			var bufs Buffers
			var count atomic.Uint64
			var wait func() error
			if tc.withWaiter {
				wait = SocketWaiter(src)
				if wait == nil {
					t.Fatal("no waiter for a *net.TCPConn")
				}
			}
			done := make(chan error, 1)
			go func() { done <- Copy(dst, src, wait, &bufs, &count) }()

			// Idle: with a waiter no buffer is out; without one, Copy holds one.
			wantIdle := int64(0)
			if !tc.withWaiter {
				wantIdle = 1
			}
			waitFor(t, "Copy to wait", func() bool { return bufs.InUse() == wantIdle })

			data := make([]byte, 3*BufferSize+100)
			rand.Read(data)
			got := make(chan []byte, 1)
			go func() {
				b, _ := io.ReadAll(io.LimitReader(sink, int64(len(data))))
				got <- b
			}()
			if _, err := peer.Write(data); err != nil {
				t.Fatal(err)
			}
			if b := <-got; !bytes.Equal(b, data) {
				t.Fatalf("copied %d bytes, want %d intact", len(b), len(data))
			}
			waitFor(t, "Copy to wait again", func() bool { return bufs.InUse() == wantIdle })
			if err := tc.end(peer); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-done:
				if (err != nil) != tc.wantErr {
					t.Fatalf("Copy = %v, want error %v", err, tc.wantErr)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Copy did not return")
			}
			if count.Load() != uint64(len(data)) || bufs.InUse() != 0 {
				t.Fatalf("count %d, buffers in use %d; want %d, 0", count.Load(), bufs.InUse(), len(data))
			}
		})
	}
}

func TestWaitReadable(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T) (syscall.RawConn, func())
		wantErr error // nil: readable; otherwise errors.Is
	}{
		{"data waiting", func(t *testing.T) (syscall.RawConn, func()) {
			a, b := tcpPair(t)
			a.Write([]byte("x"))
			rc, _ := b.SyscallConn()
			return rc, func() {
				buf := make([]byte, 1)
				if n, err := b.Read(buf); n != 1 || err != nil {
					t.Fatalf("the byte was consumed by the wait: %d, %v", n, err)
				}
			}
		}, nil},
		{"end of stream", func(t *testing.T) (syscall.RawConn, func()) {
			a, b := tcpPair(t)
			a.CloseWrite()
			rc, _ := b.SyscallConn()
			return rc, func() {}
		}, nil},
		{"a closed conn", func(t *testing.T) (syscall.RawConn, func()) {
			_, b := tcpPair(t)
			rc, _ := b.SyscallConn()
			b.Close()
			return rc, func() {}
		}, net.ErrClosed},
		{"a pending ICMP error on a connected UDP socket", func(t *testing.T) (syscall.RawConn, func()) {
			// A port nobody listens on: the kernel answers port unreachable.
			pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
			if err != nil {
				t.Fatal(err)
			}
			dead := pc.LocalAddr().(*net.UDPAddr)
			pc.Close()
			c, err := net.DialUDP("udp", nil, dead)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			c.Write([]byte("x"))
			rc, _ := c.SyscallConn()
			return rc, func() {}
		}, syscall.ECONNREFUSED},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rc, after := tc.prepare(t)
			done := make(chan error, 1)
			go func() { done <- WaitReadable(rc) }()
			select {
			case err := <-done:
				if tc.wantErr == nil && err != nil || tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
					t.Fatalf("WaitReadable = %v, want %v", err, tc.wantErr)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("WaitReadable did not return")
			}
			after()
		})
	}
}

func TestSocketWaiterOnOtherConns(t *testing.T) {
	a, _ := net.Pipe()
	defer a.Close()
	if SocketWaiter(a) != nil {
		t.Fatal("a waiter for a conn that is no syscall.Conn")
	}
}
