// Command benchtool is the load generator of edgewire's benchmark suite (make bench) and of its
// load tests: a TCP echo server, a request/response client that measures rate and latency
// percentiles over one connection, a connection-rate client (connect, one request, close), the loads
// an agent must survive (many held connections, UDP from many ports, DNS floods) and the ordinary
// client that checks everyone else is served meanwhile (load.go). Its clients print one JSON object,
// for scripts.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"slices"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "echo":
		err = runEcho(ctx, os.Args[2:])
	case "rr":
		err = runRR(ctx, os.Args[2:])
	case "connrate":
		err = runConnRate(ctx, os.Args[2:])
	case "hold":
		err = runHold(ctx, os.Args[2:])
	case "udpfan":
		err = runUDPFan(ctx, os.Args[2:])
	case "dnsflood":
		err = runDNSFlood(ctx, os.Args[2:])
	case "probe":
		err = runProbe(ctx, os.Args[2:])
	default:
		usage()
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchtool:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprint(os.Stderr, `usage:
  benchtool echo --listen ADDR                     TCP echo server (logs "listening on ADDR" when ready)
  benchtool rr --target ADDR [--duration D] [--size N]
                                                   request/response over one connection
  benchtool connrate --target ADDR [--duration D]  connect, one request, close, repeated
  benchtool hold --target ADDR --conns N [--duration D] [--source IP]
                                                   open N echo connections and hold them
  benchtool udpfan --target ADDR --ports N [--interval D] [--duration D] [--source IP]
                                                   UDP from N source ports, one datagram each per interval
  benchtool dnsflood --server ADDR --kind bytes|cluster|external [--rate PPS] [--duration D]
                                                   a DNS flood from one socket
  benchtool probe [--url URL] [--dns ADDR --name NAME] [--interval D] [--duration D]
                                                   an ordinary client: one request and one query per interval
`)
}

func runEcho(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("echo", flag.ExitOnError)
	listen := fs.String("listen", ":7000", "address to listen on")
	fs.Parse(args)
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	// The harness waits for this line before it measures.
	fmt.Fprintf(os.Stderr, "benchtool echo: listening on %s\n", ln.Addr())
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		go func() {
			defer c.Close()
			if tc, ok := c.(*net.TCPConn); ok {
				tc.SetNoDelay(true)
			}
			io.Copy(c, c)
		}()
	}
}

// Result is what the clients print.
type Result struct {
	Mode     string  `json:"mode"`
	Target   string  `json:"target"`
	Count    int     `json:"count"`
	Errors   int     `json:"errors"`
	Seconds  float64 `json:"seconds"`
	PerSec   float64 `json:"perSec"`
	P50Micro float64 `json:"p50us"`
	P99Micro float64 `json:"p99us"`
}

func runRR(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("rr", flag.ExitOnError)
	target := fs.String("target", "", "echo server address")
	duration := fs.Duration("duration", 5*time.Second, "how long to run")
	size := fs.Int("size", 1, "request size in bytes")
	fs.Parse(args)
	c, err := net.DialTimeout("tcp", *target, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.(*net.TCPConn).SetNoDelay(true)
	buf := make([]byte, *size)
	lat := make([]time.Duration, 0, 1<<20)
	start := time.Now()
	deadline := start.Add(*duration)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		t0 := time.Now()
		if _, err := c.Write(buf); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return fmt.Errorf("read: %w", err)
		}
		lat = append(lat, time.Since(t0))
	}
	return printResult("rr", *target, lat, 0, time.Since(start))
}

func runConnRate(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("connrate", flag.ExitOnError)
	target := fs.String("target", "", "echo server address")
	duration := fs.Duration("duration", 5*time.Second, "how long to run")
	fs.Parse(args)
	var lat []time.Duration
	errs := 0
	buf := make([]byte, 1)
	start := time.Now()
	deadline := start.Add(*duration)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		t0 := time.Now()
		if err := oneConn(*target, buf); err != nil {
			errs++
			if errs > 100 && len(lat) == 0 {
				return fmt.Errorf("no connection succeeded: %w", err)
			}
			continue
		}
		lat = append(lat, time.Since(t0))
	}
	return printResult("connrate", *target, lat, errs, time.Since(start))
}

func oneConn(target string, buf []byte) error {
	c, err := net.DialTimeout("tcp", target, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	// SO_LINGER 0 would skip TIME_WAIT, but a real client closes normally.
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write(buf); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	return nil
}

func printResult(mode, target string, lat []time.Duration, errs int, elapsed time.Duration) error {
	if len(lat) == 0 {
		return errors.New("no successful round trip")
	}
	slices.Sort(lat)
	pct := func(p float64) float64 {
		return float64(lat[int(p*float64(len(lat)-1))].Nanoseconds()) / 1e3
	}
	r := Result{
		Mode: mode, Target: target, Count: len(lat), Errors: errs, Seconds: elapsed.Seconds(),
		PerSec: float64(len(lat)) / elapsed.Seconds(), P50Micro: pct(0.50), P99Micro: pct(0.99),
	}
	return json.NewEncoder(os.Stdout).Encode(r)
}
