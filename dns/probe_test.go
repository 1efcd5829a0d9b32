package dns

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"
)

func TestProbe(t *testing.T) {
	s := newTestServer(t, Config{})
	_, tcp := startServer(t, s, false)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	t.Run("the server answers", func(t *testing.T) {
		if err := Probe(ctx, nil, tcp, "cluster.local"); err != nil {
			t.Fatalf("Probe: %v", err)
		}
	})
	t.Run("another zone is refused", func(t *testing.T) {
		err := Probe(ctx, nil, tcp, "example.invalid")
		if err == nil || !strings.Contains(err.Error(), "rcode") {
			t.Fatalf("Probe of a zone the server does not hold: %v, want an rcode error", err)
		}
	})
	t.Run("nothing listens", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		if err := Probe(ctx, nil, addr, "cluster.local"); err == nil {
			t.Fatal("Probe of a closed port succeeded")
		}
	})
	t.Run("a server that never answers", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		// Accepts and reads, never writes: the probe must give up at its deadline.
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			buf := make([]byte, 512)
			for {
				if _, err := c.Read(buf); err != nil {
					return
				}
			}
		}()
		short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		defer cancel()
		start := time.Now()
		if err := Probe(short, nil, ln.Addr().String(), "cluster.local"); err == nil {
			t.Fatal("Probe of a silent server succeeded")
		}
		if took := time.Since(start); took > 2*time.Second {
			t.Errorf("Probe took %v past its 200 ms deadline", took)
		}
	})
}
