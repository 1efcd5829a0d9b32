// Command testserver is a set of small real servers and clients for edgewire's end-to-end tests and
// demo: it runs inside the network namespaces the tests build, as a backend or as an upstream DNS
// resolver, or as a UDP client that checks datagram boundaries.
//
//	testserver http      --listen :8080 --name b1       GET / answers "b1\n" with header X-Backend: b1;
//	                                                     GET /big?n=BYTES streams BYTES bytes;
//	                                                     POST /sink reads the body, answers "BYTES SHA256HEX\n"
//	testserver udpecho   --listen :9000 --name b1       echoes each datagram prefixed "b1:"
//	testserver dns       --listen IP:53 --record name=ip [--record ...]
//	                                                     answers A queries for the records (UDP and TCP)
//	testserver udpclient --server IP:PORT --msg X --count N [--burst] [--timeout 2s]
//	                                                     sends N datagrams, prints each reply on a line
//
// Servers run until SIGTERM or SIGINT and then shut down cleanly (exit status 0). Each logs one line
// "listening on ADDR" to stderr once it is ready.
package main

import (
	"context"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/miekg/dns"
)

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	var err error
	switch cmd, args := os.Args[1], os.Args[2:]; cmd {
	case "http":
		err = runHTTP(ctx, args)
	case "udpecho":
		err = runUDPEcho(ctx, args)
	case "dns":
		err = runDNS(ctx, args)
	case "udpclient":
		err = runUDPClient(ctx, args)
	case "-h", "--help", "help":
		usage()
		return
	default:
		fmt.Fprintf(os.Stderr, "testserver: unknown command %q\n", cmd)
		usage()
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "testserver %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprint(os.Stderr, `usage: testserver COMMAND [flags]
commands:
  http      --listen ADDR --name NAME
  udpecho   --listen ADDR --name NAME
  dns       --listen ADDR --record NAME=IP [--record ...]
  udpclient --server ADDR --msg TEXT --count N [--burst] [--timeout D]
`)
}

func runHTTP(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("http", flag.ContinueOnError)
	listen := fs.String("listen", ":8080", "TCP address to listen on")
	name := fs.String("name", "", "backend name, sent as the body of / and in header X-Backend")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *name == "" {
		return errors.New("--name is required")
	}

	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Backend", *name)
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprintf(w, "%s\n", *name)
	})
	mux.HandleFunc("/sink", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Backend", *name)
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, "%d %x\n", n, h.Sum(nil))
	})
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Backend", *name)
		n, err := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
		if err != nil || n < 0 {
			http.Error(w, "want /big?n=BYTES", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		w.Header().Set("Content-Type", "application/octet-stream")
		buf := make([]byte, 64<<10)
		for i := range buf {
			buf[i] = byte('a' + i%26)
		}
		for n > 0 {
			chunk := min(n, int64(len(buf)))
			if _, err := w.Write(buf[:chunk]); err != nil {
				return
			}
			n -= chunk
		}
	})

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", *listen, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	fmt.Fprintf(os.Stderr, "listening on %s\n", ln.Addr())

	select {
	case err := <-errc:
		return fmt.Errorf("serve %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("shutdown %s: %w", ln.Addr(), err)
	}
	return nil
}

func runUDPEcho(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("udpecho", flag.ContinueOnError)
	listen := fs.String("listen", ":9000", "UDP address to listen on")
	name := fs.String("name", "", "backend name, prefixed to each echoed datagram as NAME:")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *name == "" {
		return errors.New("--name is required")
	}
	pc, err := net.ListenPacket("udp", *listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", *listen, err)
	}
	fmt.Fprintf(os.Stderr, "listening on %s\n", pc.LocalAddr())
	go func() {
		<-ctx.Done()
		pc.Close()
	}()

	prefix := []byte(*name + ":")
	buf := make([]byte, 65535)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("read on %s: %w", pc.LocalAddr(), err)
		}
		reply := append(append(make([]byte, 0, len(prefix)+n), prefix...), buf[:n]...)
		if _, err := pc.WriteTo(reply, from); err != nil {
			fmt.Fprintf(os.Stderr, "write to %s: %v\n", from, err)
		}
	}
}

// recordFlags collects repeated --record NAME=IP flags.
type recordFlags map[string]net.IP

func (r recordFlags) String() string {
	var parts []string
	for k, v := range r {
		parts = append(parts, k+"="+v.String())
	}
	return strings.Join(parts, ",")
}

func (r recordFlags) Set(s string) error {
	name, ip, ok := strings.Cut(s, "=")
	if !ok {
		return fmt.Errorf("record %q: want NAME=IP", s)
	}
	addr := net.ParseIP(ip).To4()
	if addr == nil {
		return fmt.Errorf("record %q: %q is not an IPv4 address", s, ip)
	}
	r[dns.CanonicalName(name)] = addr
	return nil
}

func runDNS(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("dns", flag.ContinueOnError)
	listen := fs.String("listen", ":53", "address to serve DNS on, UDP and TCP")
	records := recordFlags{}
	fs.Var(records, "record", "an A record NAME=IP (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if len(records) == 0 {
		return errors.New("at least one --record NAME=IP is required")
	}

	handler := dns.HandlerFunc(func(w dns.ResponseWriter, req *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(req)
		m.Authoritative = true
		if len(req.Question) != 1 {
			m.Rcode = dns.RcodeFormatError
			_ = w.WriteMsg(m)
			return
		}
		q := req.Question[0]
		ip, ok := records[dns.CanonicalName(q.Name)]
		switch {
		case !ok:
			m.Rcode = dns.RcodeNameError
		case q.Qtype == dns.TypeA || q.Qtype == dns.TypeANY:
			m.Answer = append(m.Answer, &dns.A{
				Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60},
				A:   ip,
			})
		}
		_ = w.WriteMsg(m)
	})

	pc, err := net.ListenPacket("udp", *listen)
	if err != nil {
		return fmt.Errorf("listen udp %s: %w", *listen, err)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		pc.Close()
		return fmt.Errorf("listen tcp %s: %w", *listen, err)
	}
	servers := []*dns.Server{
		{PacketConn: pc, Handler: handler},
		{Listener: ln, Handler: handler},
	}
	errc := make(chan error, len(servers))
	var wg sync.WaitGroup
	for _, s := range servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errc <- s.ActivateAndServe()
		}()
	}
	fmt.Fprintf(os.Stderr, "listening on %s (udp and tcp)\n", pc.LocalAddr())

	var serveErr error
	select {
	case serveErr = <-errc:
		serveErr = fmt.Errorf("serve %s: %w", *listen, serveErr)
	case <-ctx.Done():
	}
	for _, s := range servers {
		_ = s.Shutdown()
	}
	wg.Wait()
	return serveErr
}

func runUDPClient(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("udpclient", flag.ContinueOnError)
	server := fs.String("server", "", "UDP server address IP:PORT")
	msg := fs.String("msg", "hello", "datagram payload; %d is replaced by the datagram's index")
	count := fs.Int("count", 1, "number of datagrams to send")
	burst := fs.Bool("burst", false, "send all datagrams before reading any reply")
	timeout := fs.Duration("timeout", 3*time.Second, "how long to wait for each reply")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *server == "" {
		return errors.New("--server is required")
	}
	if *count < 1 {
		return fmt.Errorf("--count %d: want at least 1", *count)
	}

	var d net.Dialer
	conn, err := d.DialContext(ctx, "udp", *server)
	if err != nil {
		return fmt.Errorf("dial %s: %w", *server, err)
	}
	defer conn.Close()

	payload := func(i int) []byte {
		if strings.Contains(*msg, "%d") {
			return []byte(strings.ReplaceAll(*msg, "%d", strconv.Itoa(i)))
		}
		return []byte(*msg)
	}
	send := func(i int) error {
		if _, err := conn.Write(payload(i)); err != nil {
			return fmt.Errorf("send datagram %d to %s: %w", i, *server, err)
		}
		return nil
	}
	buf := make([]byte, 65535)
	recv := func(i int) error {
		if err := conn.SetReadDeadline(time.Now().Add(*timeout)); err != nil {
			return fmt.Errorf("set deadline: %w", err)
		}
		n, err := conn.Read(buf)
		if err != nil {
			return fmt.Errorf("reply %d from %s: %w", i, *server, err)
		}
		if _, err := fmt.Fprintf(os.Stdout, "%s\n", buf[:n]); err != nil {
			return fmt.Errorf("write stdout: %w", err)
		}
		return nil
	}

	if *burst {
		for i := range *count {
			if err := send(i); err != nil {
				return err
			}
		}
		for i := range *count {
			if err := recv(i); err != nil {
				return err
			}
		}
		return nil
	}
	for i := range *count {
		if err := send(i); err != nil {
			return err
		}
		if err := recv(i); err != nil {
			return err
		}
	}
	return nil
}
