// Command edgemeshref is the EdgeMesh-style reference of edgewire's benchmark suite (make bench): a
// TCP tunnel with the data path KubeEdge EdgeMesh uses between nodes. The client accepts plain TCP
// connections (where EdgeMesh's proxier receives a service's traffic) and carries each over one
// go-libp2p stream on its single libp2p connection to the server (TCP, TLS, yamux); the server
// dials the endpoint the stream names and copies both ways, as EdgeMesh's tunnel does.
//
// Wire protocol. For each tunnelled connection the client opens a stream of protocol
// /edgemeshref/tunnel/1.0.0 and writes a header:
//
//	version  1 byte   1
//	length   1 byte   n, 1..255
//	target   n bytes  "ip:port" (as net/netip.ParseAddrPort reads it)
//
// The server dials the target (net.Dial, 5 s timeout) and answers with one status byte: 0
// connected, 1 bad header, 2 dial failed. After a refusal it closes the stream. After 0 both ends
// copy bytes both ways (io.Copy); the end of a direction is passed on as a half-close (CloseWrite
// on the stream or on the TCP connection) and both are closed once both directions have ended; an
// error resets the stream and closes the connection. Like EdgeMesh (a CONNECT message answered by
// SUCCESS or FAILED before any data), the client waits for the status before it copies: a tunnelled
// connection costs one round trip over the tunnel on top of the TCP handshakes.
//
// Usage:
//
//	edgemeshref server --listen IP:PORT [--key-file F]
//	edgemeshref client --peer MULTIADDR/p2p/ID --listen IP:PORT --target IP:PORT [--listen IP:PORT --target IP:PORT ...]
//
// The server logs "listening on MULTIADDR/p2p/ID" and the client "listening on ..." once it is
// connected to the server and accepts connections: the benchmark harness waits for these lines.
package main

import (
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
)

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	var err error
	switch os.Args[1] {
	case "server":
		err = runServer(ctx, log.With("component", "server"), os.Args[2:])
	case "client":
		err = runClient(ctx, log.With("component", "client"), os.Args[2:])
	default:
		usage()
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "edgemeshref:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprint(os.Stderr, `usage:
  edgemeshref server --listen IP:PORT [--key-file F]
      libp2p host; each tunnel stream is dialled to the target its header names
  edgemeshref client --peer MULTIADDR/p2p/ID --listen IP:PORT --target IP:PORT [--listen ... --target ...]
      each TCP connection accepted on a --listen goes to the --target of the same position, one
      libp2p stream each over one connection to the server
`)
}

func runServer(ctx context.Context, log *slog.Logger, args []string) error {
	flags := flag.NewFlagSet("server", flag.ExitOnError)
	listen := flags.String("listen", "", "IP:PORT of the libp2p TCP listener")
	keyFile := flags.String("key-file", "", "libp2p private key, created if missing (default: a new key each start)")
	flags.Parse(args)
	ap, err := netip.ParseAddrPort(*listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	priv, err := loadOrCreateKey(*keyFile)
	if err != nil {
		return err
	}
	addr, err := tcpMultiaddr(ap)
	if err != nil {
		return fmt.Errorf("--listen %s: %w", ap, err)
	}
	h, err := newHost(priv, addr)
	if err != nil {
		return err
	}
	defer h.Close()
	srv := &server{log: log}
	h.SetStreamHandler(ProtocolID, srv.handle)
	var full []string
	for _, a := range h.Addrs() {
		full = append(full, fmt.Sprintf("%s/p2p/%s", a, h.ID()))
	}
	// The harness waits for this line and reads the address from it.
	fmt.Fprintf(os.Stderr, "edgemeshref server: listening on %s\n", strings.Join(full, " "))
	<-ctx.Done()
	h.RemoveStreamHandler(ProtocolID)
	return nil
}

// forward is one --listen/--target pair of the client.
type forward struct {
	listen, target netip.AddrPort
}

func runClient(ctx context.Context, log *slog.Logger, args []string) error {
	flags := flag.NewFlagSet("client", flag.ExitOnError)
	peerAddr := flags.String("peer", "", "the server's multiaddr with /p2p/ID")
	var listens, targets []netip.AddrPort
	addrFlag := func(dst *[]netip.AddrPort) func(string) error {
		return func(s string) error {
			ap, err := netip.ParseAddrPort(s)
			*dst = append(*dst, ap)
			return err
		}
	}
	flags.Func("listen", "IP:PORT to accept connections on (repeatable, paired with --target in order)", addrFlag(&listens))
	flags.Func("target", "IP:PORT the server dials for the --listen of the same position (repeatable)", addrFlag(&targets))
	flags.Parse(args)
	if len(listens) == 0 || len(listens) != len(targets) {
		return fmt.Errorf("want as many --listen as --target, at least one (got %d and %d)", len(listens), len(targets))
	}
	info, err := peer.AddrInfoFromString(*peerAddr)
	if err != nil {
		return fmt.Errorf("--peer: %w", err)
	}
	priv, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return fmt.Errorf("generate key: %w", err)
	}
	h, err := newHost(priv)
	if err != nil {
		return err
	}
	defer h.Close()
	// Permanent, so that the host can dial again should the connection drop.
	h.Peerstore().AddAddrs(info.ID, info.Addrs, peerstore.PermanentAddrTTL)
	if err := connect(ctx, h, *info); err != nil {
		return err
	}

	c := &client{log: log, host: h, peer: info.ID}
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	var desc []string
	for i, l := range listens {
		ln, err := net.Listen("tcp", l.String())
		if err != nil {
			return fmt.Errorf("listen: %w", err)
		}
		lns = append(lns, ln)
		desc = append(desc, fmt.Sprintf("%s (→ %s)", ln.Addr(), targets[i]))
	}
	errc := make(chan error, len(lns))
	var accepting sync.WaitGroup
	for i, ln := range lns {
		accepting.Go(func() { errc <- c.serve(ctx, ln, targets[i]) })
	}
	fmt.Fprintf(os.Stderr, "edgemeshref client: connected to %s; listening on %s\n", info.ID, strings.Join(desc, ", "))
	select {
	case <-ctx.Done():
		err = nil
	case err = <-errc:
	}
	for _, ln := range lns {
		ln.Close()
	}
	accepting.Wait()
	// Closing the host resets the streams of the connections still open, which ends their pipes.
	h.Close()
	c.wg.Wait()
	return err
}

// connect connects h to info, retrying for a while: the server may still be starting.
func connect(ctx context.Context, h host.Host, info peer.AddrInfo) error {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	for {
		err := h.Connect(ctx, info)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("connect to %s: %w", info, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// loadOrCreateKey reads a libp2p private key from path, or creates one there if the file does not
// exist; with an empty path it returns a new key.
func loadOrCreateKey(path string) (crypto.PrivKey, error) {
	if path != "" {
		b, err := os.ReadFile(path)
		if err == nil {
			priv, err := crypto.UnmarshalPrivateKey(b)
			if err != nil {
				return nil, fmt.Errorf("key file %s: %w", path, err)
			}
			return priv, nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("key file: %w", err)
		}
	}
	priv, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	if path == "" {
		return priv, nil
	}
	b, err := crypto.MarshalPrivateKey(priv)
	if err != nil {
		return nil, fmt.Errorf("marshal key: %w", err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return nil, fmt.Errorf("key file: %w", err)
	}
	return priv, nil
}
