// Command relayload loads a mesh-relay the way strangers and nodes would, for the relay load test
// (e2e/load_relay_test.go). It runs inside a lab namespace, one role per invocation:
//
//	relayload flood --relay MULTIADDR [--streams 500] [--peers 8] [--duration 30s] [--partial-every 2]
//	relayload node  --relay MULTIADDR --token-file FILE [--duration 5m]
//	relayload join  --relay MULTIADDR --token-file FILE [--timeout 15s]
//
// flood keeps --streams control streams open, or being opened, from several libp2p identities that
// never register, for --duration: each announces a frame of the largest size (1 MiB) and sends
// all of it but the last byte, or (every --partial-every-th) announces 4 KiB and sends half; then
// it holds the stream, and opens it again a second after the relay refuses or closes it. It
// prints a JSON relaytest.FloodResult.
//
// node registers two nodes, binds a UDP socket of each to the relay and, until SIGTERM or
// --duration, makes requests through the relay: every 100 ms a DATA frame from the first node to
// the second, which echoes it back (a failure when no echo is back within 1 s), and every second a
// punch request, which must come back as a punch within 2 s. It prints "ready" once both nodes
// are registered and bound, and on exit a JSON nodeResult.
//
// join registers a fresh node and prints how long it took as JSON; it exits 1 if it did not
// register within --timeout.
package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/edgewire/edgewire/relay"
	"github.com/edgewire/edgewire/relay/relaytest"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: relayload flood|node|join [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "flood":
		err = flood(os.Args[2:])
	case "node":
		err = node(os.Args[2:])
	case "join":
		err = join(os.Args[2:])
	default:
		err = fmt.Errorf("unknown role %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "relayload:", err)
		os.Exit(1)
	}
}

func printJSON(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	fmt.Println(string(b))
	return nil
}

func flood(args []string) error {
	fs := flag.NewFlagSet("flood", flag.ExitOnError)
	var cfg relaytest.FloodConfig
	fs.StringVar(&cfg.Relay, "relay", "", "relay multiaddr with /p2p/")
	fs.IntVar(&cfg.Streams, "streams", 500, "control streams kept open or being opened")
	fs.IntVar(&cfg.Peers, "peers", 8, "libp2p identities to open them from")
	fs.DurationVar(&cfg.Duration, "duration", 30*time.Second, "how long the flood lasts")
	fs.IntVar(&cfg.PartialEvery, "partial-every", 2, "every n-th stream announces 4 KiB and sends half (0: none)")
	fs.Parse(args)
	cfg.PartialAnnounce = 4 << 10
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	res, err := relaytest.Flood(ctx, cfg)
	if perr := printJSON(res); perr != nil {
		return perr
	}
	return err
}

// newClient returns a started relay client registering a node called name.
func newClient(relayAddr, token, name string, cb relay.ClientConfig) (*relay.Client, error) {
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	wg := make([]byte, 32)
	rand.Read(wg)
	cb.Relays = []string{relayAddr}
	cb.JoinToken = token
	cb.Key = key
	cb.Self = relay.Registration{Name: name, WireGuardKey: base64.StdEncoding.EncodeToString(wg)}
	c, err := relay.NewClient(cb)
	if err != nil {
		return nil, err
	}
	if err := c.Start(); err != nil {
		return nil, err
	}
	return c, nil
}

func readToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("join token: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// nodeResult is what node prints on exit.
type nodeResult struct {
	// Requests made through the relay's UDP path, and those with no echo within 1 s.
	Requests, Failures int
	MaxRTTMs           float64
	// Punch requests over the control streams, and those with no punch back within 2 s.
	Punches, PunchFailures int
	// SessionDrops counts registrations that went down while measuring.
	SessionDrops int
	FirstErrors  []string
}

// legit is one of node's two nodes.
type legit struct {
	name    string
	c       *relay.Client
	session chan relay.Session // each session that comes up
	punch   chan struct{}
	known   atomic.Bool // the other node is in its directory
	conn    *net.UDPConn
	sess    relay.Session
}

func node(args []string) error {
	fs := flag.NewFlagSet("node", flag.ExitOnError)
	relayAddr := fs.String("relay", "", "relay multiaddr")
	tokenFile := fs.String("token-file", "", "join token file")
	duration := fs.Duration("duration", 5*time.Minute, "stop after this long")
	fs.Parse(args)
	token, err := readToken(*tokenFile)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *duration)
	defer cancel()

	var measuring atomic.Bool
	var drops atomic.Int64
	nodes := []*legit{{name: "legit-a"}, {name: "legit-b"}}
	for i, n := range nodes {
		other := nodes[1-i].name
		n.session = make(chan relay.Session, 16)
		n.punch = make(chan struct{}, 16)
		c, err := newClient(*relayAddr, token, n.name, relay.ClientConfig{
			OnSession: func(s relay.Session, up bool) {
				if up {
					n.session <- s
				} else if measuring.Load() {
					drops.Add(1)
				}
			},
			OnDirectory: func(_ int, nodes []relay.DirEntry) {
				for _, e := range nodes {
					if e.Name == other {
						n.known.Store(true)
					}
				}
			},
			OnPunch: func(int, relay.Punch) {
				select {
				case n.punch <- struct{}{}:
				default:
				}
			},
		})
		if err != nil {
			return fmt.Errorf("%s: %w", n.name, err)
		}
		defer c.Close()
		n.c = c
	}
	for _, n := range nodes {
		select {
		case n.sess = <-n.session:
		case <-time.After(20 * time.Second):
			return fmt.Errorf("%s: not registered within 20 s", n.name)
		}
		n.conn, err = net.ListenUDP("udp4", nil)
		if err != nil {
			return err
		}
		defer n.conn.Close()
		if err := bind(n.conn, n.sess); err != nil {
			return fmt.Errorf("%s: %w", n.name, err)
		}
	}
	a, b := nodes[0], nodes[1]
	for deadline := time.Now().Add(10 * time.Second); !a.known.Load(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			return errors.New("legit-a never saw legit-b in its directory")
		}
	}
	measuring.Store(true)
	fmt.Println("ready")

	var res nodeResult
	var mu sync.Mutex
	fail := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		if len(res.FirstErrors) < 5 {
			res.FirstErrors = append(res.FirstErrors, time.Now().Format("15:04:05.000 ")+fmt.Sprintf(format, args...))
		}
	}
	var wg sync.WaitGroup
	// b echoes every DATA frame back to its sender.
	wg.Go(func() {
		buf := make([]byte, 2048)
		for ctx.Err() == nil {
			b.conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			n, _, err := b.conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				continue
			}
			id, payload, err := relay.ParseData(buf[:n])
			if err != nil {
				continue
			}
			b.conn.WriteToUDPAddrPort(append(relay.AppendDataHeader(nil, id), payload...), b.sess.UDPAddr)
		}
	})
	// Punches over the control streams.
	wg.Go(func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			mu.Lock()
			res.Punches++
			mu.Unlock()
			pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			err := a.c.RequestPunch(pctx, 0, b.name)
			if err == nil {
				select {
				case <-a.punch:
				case <-pctx.Done():
					err = errors.New("no punch back within 2 s")
				}
			}
			cancel()
			if err != nil && ctx.Err() == nil {
				mu.Lock()
				res.PunchFailures++
				mu.Unlock()
				fail("punch: %v", err)
			}
		}
	})
	// Requests through the UDP relay, from a to b and back.
	buf := make([]byte, 2048)
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for seq := uint64(1); ; seq++ {
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		if ctx.Err() != nil {
			break
		}
		start := time.Now()
		frame := binary.BigEndian.AppendUint64(relay.AppendDataHeader(nil, b.sess.ID), seq)
		a.conn.WriteToUDPAddrPort(frame, a.sess.UDPAddr)
		res.Requests++
		ok := false
		for !ok {
			a.conn.SetReadDeadline(start.Add(time.Second))
			n, _, err := a.conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				break
			}
			if _, p, err := relay.ParseData(buf[:n]); err == nil && len(p) == 8 && binary.BigEndian.Uint64(p) == seq {
				ok = true
			}
		}
		if !ok {
			res.Failures++
			fail("request %d: no echo within 1 s", seq)
			continue
		}
		res.MaxRTTMs = max(res.MaxRTTMs, float64(time.Since(start).Microseconds())/1000)
	}
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	res.SessionDrops = int(drops.Load())
	return printJSON(res)
}

// bind BINDs conn to the node of session s, retrying until a BINDACK answers.
func bind(conn *net.UDPConn, s relay.Session) error {
	buf := make([]byte, 1500)
	for try := range 50 {
		nonce := uint64(try + 1)
		if _, err := conn.WriteToUDPAddrPort(relay.AppendBind(nil, s.ID, nonce, s.Key), s.UDPAddr); err != nil {
			return fmt.Errorf("bind: %w", err)
		}
		conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		n, _, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			continue
		}
		if got, _, err := relay.ParseBindAck(buf[:n]); err == nil && got == nonce {
			conn.SetReadDeadline(time.Time{})
			return nil
		}
	}
	return fmt.Errorf("no BINDACK from %v", s.UDPAddr)
}

// joinResult is what join prints.
type joinResult struct {
	Registered bool
	Ms         float64
}

func join(args []string) error {
	fs := flag.NewFlagSet("join", flag.ExitOnError)
	relayAddr := fs.String("relay", "", "relay multiaddr")
	tokenFile := fs.String("token-file", "", "join token file")
	timeout := fs.Duration("timeout", 15*time.Second, "give up after this long")
	fs.Parse(args)
	token, err := readToken(*tokenFile)
	if err != nil {
		return err
	}
	var suffix [4]byte
	rand.Read(suffix[:])
	up := make(chan struct{}, 1)
	start := time.Now()
	c, err := newClient(*relayAddr, token, fmt.Sprintf("join-%x", suffix), relay.ClientConfig{
		OnSession: func(_ relay.Session, isUp bool) {
			if isUp {
				select {
				case up <- struct{}{}:
				default:
				}
			}
		},
	})
	if err != nil {
		return err
	}
	defer c.Close()
	res := joinResult{}
	select {
	case <-up:
		res = joinResult{Registered: true, Ms: float64(time.Since(start).Microseconds()) / 1000}
	case <-time.After(*timeout):
	}
	if err := printJSON(res); err != nil {
		return err
	}
	if !res.Registered {
		return fmt.Errorf("not registered within %v", *timeout)
	}
	return nil
}
