// Command fwdprobe speaks edgewire's agent-to-agent forward protocol (overlay/forward) directly, as
// another node's agent would, so the end-to-end tests can check what a node's forward listener
// accepts and refuses. It runs inside a node's network namespace, where the node's agent routes the
// overlay range to WireGuard.
//
//	fwdprobe --node OVERLAY-ADDR --target IP:PORT [--port 51821] [--timeout 5s]
//
// It asks the agent at OVERLAY-ADDR for a TCP flow to IP:PORT. When the flow is accepted it sends
// "GET / HTTP/1.0" (the targets the tests use are HTTP servers), prints "accepted" and the first
// line of the answer, and exits 0. When the listener refuses the target it prints "refused: ERR"
// and exits 3; any other failure prints "error: ERR" and exits 1.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/forward"
)

// Exit statuses.
const (
	exitOK      = 0
	exitError   = 1
	exitUsage   = 2
	exitRefused = 3
)

func main() {
	node := flag.String("node", "", "overlay address of the node whose forward listener to ask")
	target := flag.String("target", "", "target endpoint IP:PORT on that node")
	port := flag.Uint("port", forward.DefaultPort, "forward port")
	timeout := flag.Duration("timeout", 5*time.Second, "bound on the whole exchange")
	flag.Parse()

	nodeAddr, err := netip.ParseAddr(*node)
	if err != nil {
		fmt.Fprintf(os.Stderr, "fwdprobe: --node: %v\n", err)
		os.Exit(exitUsage)
	}
	targetAP, err := netip.ParseAddrPort(*target)
	if err != nil {
		fmt.Fprintf(os.Stderr, "fwdprobe: --target: %v\n", err)
		os.Exit(exitUsage)
	}
	os.Exit(probe(nodeAddr, uint16(*port), targetAP, *timeout))
}

func probe(node netip.Addr, port uint16, target netip.AddrPort, timeout time.Duration) int {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	d := forward.Dialer{Port: port, Timeout: timeout}
	conn, err := d.Dial(ctx, discovery.TCP, node, target)
	switch {
	case errors.Is(err, forward.ErrRefused):
		fmt.Printf("refused: %v\n", err)
		return exitRefused
	case err != nil:
		fmt.Printf("error: %v\n", err)
		return exitError
	}
	defer conn.Close()
	fmt.Println("accepted")
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		fmt.Printf("error: set deadline: %v\n", err)
		return exitError
	}
	if _, err := conn.Write([]byte("GET / HTTP/1.0\r\nHost: fwdprobe\r\n\r\n")); err != nil {
		fmt.Printf("error: send request: %v\n", err)
		return exitError
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		fmt.Printf("error: read answer: %v\n", err)
		return exitError
	}
	fmt.Println(strings.TrimSpace(line))
	return exitOK
}
