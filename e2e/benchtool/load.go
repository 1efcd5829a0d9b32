package main

// The load modes: what the agent must survive (hold, udpfan, dnsflood) and the client that checks
// everyone else is still served meanwhile (probe). Each prints one JSON object when it ends.

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// raiseNoFile lets a load client open as many sockets as its hard limit allows.
func raiseNoFile() {
	var rl syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl) == nil && rl.Cur < rl.Max {
		rl.Cur = rl.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl)
	}
}

// sourceDialer binds to source when it is set.
func sourceDialer(source string, network string, timeout time.Duration) (*net.Dialer, error) {
	d := &net.Dialer{Timeout: timeout}
	if source == "" {
		return d, nil
	}
	ip := net.ParseIP(source)
	if ip == nil {
		return nil, fmt.Errorf("--source %q: not an IP address", source)
	}
	switch network {
	case "tcp":
		d.LocalAddr = &net.TCPAddr{IP: ip}
	case "udp":
		d.LocalAddr = &net.UDPAddr{IP: ip}
	}
	return d, nil
}

func printJSON(v any) error {
	return json.NewEncoder(os.Stdout).Encode(v)
}

// HoldResult is what hold prints.
type HoldResult struct {
	Mode    string         `json:"mode"`
	Wanted  int            `json:"wanted"`
	Opened  int            `json:"opened"`  // connections that completed one echo round trip
	Failed  int            `json:"failed"`  // dials or round trips that failed
	MaxOpen int            `json:"maxOpen"` // most connections open at once
	Errors  map[string]int `json:"errors"`  // failures by error text (first 60 bytes)
}

// runHold opens conns TCP connections to an echo server, proves each with one round trip, and
// holds them open until duration has passed since the start.
func runHold(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("hold", flag.ExitOnError)
	target := fs.String("target", "", "echo server address")
	conns := fs.Int("conns", 1000, "connections to hold")
	parallel := fs.Int("parallel", 256, "dials in flight")
	duration := fs.Duration("duration", 30*time.Second, "how long to hold them, from the start")
	source := fs.String("source", "", "source IP to bind")
	fs.Parse(args)
	raiseNoFile()
	d, err := sourceDialer(*source, "tcp", 5*time.Second)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *duration)
	defer cancel()
	var (
		mu     sync.Mutex
		res    = HoldResult{Mode: "hold", Wanted: *conns, Errors: map[string]int{}}
		open   atomic.Int64
		held   []net.Conn
		wg     sync.WaitGroup
		tokens = make(chan struct{}, *parallel)
	)
	fail := func(err error) {
		msg := err.Error()
		if len(msg) > 60 {
			msg = msg[len(msg)-60:]
		}
		mu.Lock()
		res.Failed++
		res.Errors[msg]++
		mu.Unlock()
	}
	for i := 0; i < *conns && ctx.Err() == nil; i++ {
		tokens <- struct{}{}
		wg.Go(func() {
			defer func() { <-tokens }()
			c, err := d.DialContext(ctx, "tcp", *target)
			if err != nil {
				fail(err)
				return
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			buf := []byte{'x'}
			if _, err := c.Write(buf); err == nil {
				_, err = io.ReadFull(c, buf)
			}
			if err != nil {
				c.Close()
				fail(err)
				return
			}
			c.SetDeadline(time.Time{})
			n := open.Add(1)
			mu.Lock()
			res.Opened++
			res.MaxOpen = max(res.MaxOpen, int(n))
			held = append(held, c)
			mu.Unlock()
		})
	}
	wg.Wait()
	<-ctx.Done()
	for _, c := range held {
		c.Close()
	}
	return printJSON(res)
}

// FanResult is what udpfan prints.
type FanResult struct {
	Mode    string `json:"mode"`
	Ports   int    `json:"ports"` // sockets opened
	Sent    int64  `json:"sent"`
	Replies int64  `json:"replies"`
	Errors  int64  `json:"errors"`
}

// runUDPFan sends datagrams to target from ports distinct source ports, each port one datagram per
// interval, for duration.
func runUDPFan(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("udpfan", flag.ExitOnError)
	target := fs.String("target", "", "UDP echo server address")
	ports := fs.Int("ports", 1000, "source ports")
	interval := fs.Duration("interval", time.Second, "each port sends one datagram this often")
	duration := fs.Duration("duration", 30*time.Second, "how long to send")
	size := fs.Int("size", 100, "datagram size")
	source := fs.String("source", "", "source IP to bind")
	fs.Parse(args)
	raiseNoFile()
	d, err := sourceDialer(*source, "udp", 5*time.Second)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *duration)
	defer cancel()
	res := FanResult{Mode: "udpfan"}
	var sent, replies, errs atomic.Int64
	socks := make([]net.Conn, 0, *ports)
	defer func() {
		for _, c := range socks {
			c.Close()
		}
	}()
	for range *ports {
		c, err := d.DialContext(ctx, "udp", *target)
		if err != nil {
			errs.Add(1)
			continue
		}
		socks = append(socks, c)
	}
	res.Ports = len(socks)
	var wg sync.WaitGroup
	// One reader per 64 sockets would still be thousands of goroutines; a reader per socket is
	// what a real client fleet looks like and costs the client, not the agent.
	for _, c := range socks {
		wg.Go(func() {
			buf := make([]byte, 2048)
			for {
				if _, err := c.Read(buf); err != nil {
					return
				}
				replies.Add(1)
			}
		})
	}
	payload := make([]byte, *size)
	// Spread each round over the interval.
	gap := *interval / time.Duration(max(1, len(socks)))
	next := time.Now()
	for ctx.Err() == nil {
		for _, c := range socks {
			if ctx.Err() != nil {
				break
			}
			if _, err := c.Write(payload); err != nil {
				errs.Add(1)
			} else {
				sent.Add(1)
			}
			next = next.Add(gap)
			if w := time.Until(next); w > time.Millisecond {
				time.Sleep(w) // pacing the load generator, not waiting for a condition
			}
		}
	}
	// Replies in flight at the end still count.
	for _, c := range socks {
		c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	}
	wg.Wait()
	res.Sent, res.Replies, res.Errors = sent.Load(), replies.Load(), errs.Load()
	return printJSON(res)
}

// FloodResult is what dnsflood prints.
type FloodResult struct {
	Mode    string  `json:"mode"`
	Kind    string  `json:"kind"`
	Sent    int64   `json:"sent"`
	Seconds float64 `json:"seconds"`
	PPS     float64 `json:"pps"`
	Replies int64   `json:"replies"`
}

// runDNSFlood sends datagrams to a DNS server at rate packets per second for duration: random
// bytes, queries for random names in the cluster zone, or for random names outside it.
func runDNSFlood(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("dnsflood", flag.ExitOnError)
	server := fs.String("server", "", "DNS server ip:port")
	kind := fs.String("kind", "bytes", "bytes, cluster or external")
	zone := fs.String("zone", "cluster.local", "cluster zone (kind cluster)")
	rate := fs.Int("rate", 200000, "packets per second")
	duration := fs.Duration("duration", 5*time.Second, "how long to send")
	source := fs.String("source", "", "source IP to bind")
	fs.Parse(args)
	if *kind != "bytes" && *kind != "cluster" && *kind != "external" {
		return fmt.Errorf("--kind %q: want bytes, cluster or external", *kind)
	}
	d, err := sourceDialer(*source, "udp", 5*time.Second)
	if err != nil {
		return err
	}
	c, err := d.DialContext(ctx, "udp", *server)
	if err != nil {
		return err
	}
	defer c.Close()
	var replies atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			if _, err := c.Read(buf); err != nil {
				return
			}
			replies.Add(1)
		}
	}()
	rng := rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	pkt := make([]byte, 0, 512)
	build := func() []byte {
		switch *kind {
		case "bytes":
			pkt = pkt[:8+rng.IntN(120)]
			for i := range pkt {
				pkt[i] = byte(rng.Uint32())
			}
			return pkt
		case "cluster":
			return query(pkt[:0], rng, fmt.Sprintf("s%x.ns%x.svc.%s", rng.Uint32(), rng.Uint32()%64, *zone))
		default:
			return query(pkt[:0], rng, fmt.Sprintf("h%x.example%x.test", rng.Uint64(), rng.Uint32()%1024))
		}
	}
	start := time.Now()
	end := start.Add(*duration)
	var sent int64
	// Send in slices of 1 ms: rate/1000 packets, then wait for the next slice.
	perTick := max(1, *rate/1000)
	tick := start
	for ctx.Err() == nil {
		now := time.Now()
		if now.After(end) {
			break
		}
		for range perTick {
			if _, err := c.Write(build()); err == nil {
				sent++
			}
		}
		tick = tick.Add(time.Millisecond)
		if w := time.Until(tick); w > 0 {
			time.Sleep(w) // pacing the load generator
		}
	}
	elapsed := time.Since(start)
	c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	<-done
	return printJSON(FloodResult{Mode: "dnsflood", Kind: *kind, Sent: sent, Seconds: elapsed.Seconds(),
		PPS: float64(sent) / elapsed.Seconds(), Replies: replies.Load()})
}

// query appends a DNS A query for name to b.
func query(b []byte, rng *rand.Rand, name string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(rng.Uint32()))
	b = append(b, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0) // RD; one question
	start := 0
	for i := 0; i <= len(name); i++ {
		if i == len(name) || name[i] == '.' {
			b = append(b, byte(i-start))
			b = append(b, name[start:i]...)
			start = i + 1
		}
	}
	b = append(b, 0, 0, 1, 0, 1) // root, type A, class IN
	return b
}

// ProbeResult is what probe prints: the experience of an ordinary client during a load.
type ProbeResult struct {
	Mode             string         `json:"mode"`
	Requests         int            `json:"requests"`
	RequestFailures  int            `json:"requestFailures"`
	RequestP99Micro  float64        `json:"requestP99us"`
	DNSQueries       int            `json:"dnsQueries"`
	DNSFailures      int            `json:"dnsFailures"`
	DNSWithin100ms   int            `json:"dnsWithin100ms"`
	DNSP99Micro      float64        `json:"dnsP99us"`
	FailureSamples   map[string]int `json:"failureSamples"`
	WorstGapMicro    float64        `json:"worstGapUs"` // longest time between two successful requests
	FirstFailureSecs float64        `json:"firstFailureSecs"`
}

// runProbe makes one HTTP request (new connection, --timeout) and one DNS query every interval
// until SIGTERM or duration, and prints how they went.
func runProbe(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("probe", flag.ExitOnError)
	url := fs.String("url", "", "HTTP URL to GET (200 expected)")
	dnsServer := fs.String("dns", "", "DNS server ip:port")
	name := fs.String("name", "", "name to ask the DNS server for (A)")
	interval := fs.Duration("interval", 50*time.Millisecond, "one request and one query this often")
	timeout := fs.Duration("timeout", 5*time.Second, "request timeout")
	dnsTimeout := fs.Duration("dns-timeout", time.Second, "DNS query timeout")
	duration := fs.Duration("duration", time.Hour, "stop after this long (or at SIGTERM)")
	source := fs.String("source", "", "source IP to bind")
	fs.Parse(args)
	ctx, cancel := context.WithTimeout(ctx, *duration)
	defer cancel()
	td, err := sourceDialer(*source, "tcp", *timeout)
	if err != nil {
		return err
	}
	ud, _ := sourceDialer(*source, "udp", *dnsTimeout)
	client := &http.Client{Timeout: *timeout, Transport: &http.Transport{
		DialContext: td.DialContext, DisableKeepAlives: true,
	}}
	res := ProbeResult{Mode: "probe", FailureSamples: map[string]int{}}
	var mu sync.Mutex
	var reqLat, dnsLat []time.Duration
	start := time.Now()
	lastOK := start
	failed := func(what string, err error) {
		msg := what + ": " + err.Error()
		if len(msg) > 80 {
			msg = msg[:80]
		}
		mu.Lock()
		res.FailureSamples[msg]++
		if res.FirstFailureSecs == 0 {
			res.FirstFailureSecs = time.Since(start).Seconds()
		}
		mu.Unlock()
	}
	var wg sync.WaitGroup
	rng := rand.New(rand.NewPCG(1, 2))
	t := time.NewTicker(*interval)
	defer t.Stop()
	for ctx.Err() == nil {
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		if ctx.Err() != nil {
			break
		}
		if *url != "" {
			wg.Go(func() {
				t0 := time.Now()
				resp, err := client.Get(*url)
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if err == nil && resp.StatusCode != 200 {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				mu.Lock()
				res.Requests++
				if err != nil {
					res.RequestFailures++
				} else {
					reqLat = append(reqLat, time.Since(t0))
					now := time.Now()
					if gap := now.Sub(lastOK); gap > time.Duration(res.WorstGapMicro*1e3) {
						res.WorstGapMicro = float64(gap.Microseconds())
					}
					lastOK = now
				}
				mu.Unlock()
				if err != nil {
					failed("request", err)
				}
			})
		}
		if *dnsServer != "" {
			mu.Lock()
			id := uint16(rng.Uint32())
			mu.Unlock()
			wg.Go(func() {
				t0 := time.Now()
				err := dnsQuery(ud, *dnsServer, *name, id, *dnsTimeout)
				took := time.Since(t0)
				mu.Lock()
				res.DNSQueries++
				if err != nil {
					res.DNSFailures++
				} else {
					dnsLat = append(dnsLat, took)
					if took <= 100*time.Millisecond {
						res.DNSWithin100ms++
					}
				}
				mu.Unlock()
				if err != nil {
					failed("dns", err)
				}
			})
		}
	}
	wg.Wait()
	res.RequestP99Micro = p99(reqLat)
	res.DNSP99Micro = p99(dnsLat)
	return printJSON(res)
}

func p99(ds []time.Duration) float64 {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	return float64(ds[len(ds)*99/100].Microseconds())
}

// dnsQuery asks server for name's A record over UDP and checks the reply's ID and rcode.
func dnsQuery(d *net.Dialer, server, name string, id uint16, timeout time.Duration) error {
	c, err := d.Dial("udp", server)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	rng := rand.New(rand.NewPCG(uint64(id), 0))
	q := query(nil, rng, name)
	binary.BigEndian.PutUint16(q, id)
	if _, err := c.Write(q); err != nil {
		return err
	}
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		if n < 12 || binary.BigEndian.Uint16(buf) != id {
			continue
		}
		if rcode := buf[3] & 0x0f; rcode != 0 {
			return fmt.Errorf("rcode %d", rcode)
		}
		if binary.BigEndian.Uint16(buf[6:]) == 0 {
			return fmt.Errorf("no answer")
		}
		return nil
	}
}
