//go:build bench

package e2e

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The UDP packet-rate measurements of the crossnode topology: as fast as the client sends
// (cross.udp-1400.*), and the highest paced rate carried with at most 1% loss
// (cross.udp-1400-paced.*).

// udpDatagram is the payload of the UDP packet-rate measurement's datagrams.
const udpDatagram = 1400

// crossUDP measures the cross-node topology's UDP packet rate at 1,400-byte datagrams (called at
// the end of crossNode): first the highest paced rate carried with at most 1% loss over the
// wireguard-go pair and through the mesh (udpPaced), then iperf3 -u -l 1400 -b 0 (as fast as the client sends) for benchDuration
// from client (node2) to node1 over the LAN (cross.udp-1400.veth), to node1 over the bare
// wireguard-go pair (cross.udp-1400.wireguard-go) and to pod1 through the iperf service's IP
// (cross.udp-1400.mesh: iperf3's control connection through the service's TCP port, its
// datagrams through the UDP port, both to pod1 over the overlay). The value is the datagrams the
// server received per second; Raw has what the client sent and the loss. A 1,400-byte datagram is
// a 1,428-byte IPv4 packet: larger than the 1420-byte MTU of mesh0 and of the reference
// wireguard-go, the sending kernel fragments it in two there; on the LAN (1500) it is one packet.
func (b *bench) crossUDP(t *testing.T, client *Node) {
	// Paced first: a flood loses one fragment of many datagrams, and the receiving kernel keeps
	// their other fragments for its reassembly timeout (30 s for IPv4, 60 s for the overlay's IPv6),
	// above its memory threshold, dropping new fragments meanwhile.
	const pp = "cross.udp-1400-paced."
	b.udpPaced(t, pp+"wireguard-go", client, "10.99.0.1")
	b.udpPaced(t, pp+"mesh", client, benchIperfIP, pp+"wireguard-go")
	const p = "cross.udp-1400."
	for _, tg := range []struct {
		name, host string
		refs       []string
	}{
		{"veth", "10.77.2.1", nil},
		{"wireguard-go", "10.99.0.1", []string{p + "veth"}},
		{"mesh", benchIperfIP, []string{p + "wireguard-go", p + "veth"}},
	} {
		b.udp(t, p+tg.name, client, tg.host, tg.refs...)
	}
}

// UDPSummary is what a UDP packet-rate measurement keeps of iperf3 -J's report.
type UDPSummary struct {
	Datagram int `json:"datagramBytes"`
	// SentPackets is what the client sent; ReceivedPackets what the server received (its bytes
	// over the datagram size); LostPercent the server's count of missing sequence numbers.
	SentPackets     int64   `json:"sentPackets"`
	ReceivedPackets int64   `json:"receivedPackets"`
	LostPercent     float64 `json:"lostPercent"`
	JitterMillis    float64 `json:"jitterMs"`
	Seconds         float64 `json:"seconds"`
	// CPU use of the iperf3 client (host) and server (remote), percent of one CPU.
	HostCPU   float64 `json:"hostCPU"`
	RemoteCPU float64 `json:"remoteCPU"`
}

// parseIperfUDP reads the summary of a UDP test out of iperf3 -J's combined output.
func parseIperfUDP(out string, runErr error) (UDPSummary, error) {
	i := strings.Index(out, "{")
	if i < 0 {
		return UDPSummary{}, fmt.Errorf("%v: %s", runErr, strings.TrimSpace(out))
	}
	var r struct {
		Error string `json:"error"`
		End   struct {
			SumSent struct {
				Packets int64 `json:"packets"`
			} `json:"sum_sent"`
			SumReceived struct {
				Seconds     float64 `json:"seconds"`
				Bytes       int64   `json:"bytes"`
				LostPercent float64 `json:"lost_percent"`
				JitterMs    float64 `json:"jitter_ms"`
			} `json:"sum_received"`
			CPU iperfCPU `json:"cpu_utilization_percent"`
		} `json:"end"`
	}
	if err := json.NewDecoder(strings.NewReader(out[i:])).Decode(&r); err != nil {
		return UDPSummary{}, fmt.Errorf("%v: iperf3 output: %v: %s", runErr, err, lastLines(out, 5))
	}
	if r.Error != "" {
		return UDPSummary{}, fmt.Errorf("iperf3: %s", r.Error)
	}
	e := r.End
	s := UDPSummary{
		Datagram:        udpDatagram,
		SentPackets:     e.SumSent.Packets,
		ReceivedPackets: e.SumReceived.Bytes / udpDatagram,
		LostPercent:     e.SumReceived.LostPercent,
		JitterMillis:    e.SumReceived.JitterMs,
		Seconds:         e.SumReceived.Seconds,
		HostCPU:         e.CPU.Host,
		RemoteCPU:       e.CPU.Remote,
	}
	if runErr != nil {
		return s, runErr
	}
	if s.ReceivedPackets <= 0 || s.Seconds <= 0 {
		return s, fmt.Errorf("iperf3: the server received nothing (the client sent %d datagrams)", s.SentPackets)
	}
	return s, nil
}

// iperfUDP runs iperf3 -u from client to host:5201 at bitrate (iperf3's -b; "0": as fast as it
// can) for d, and reads its summary.
func iperfUDP(client *Node, host, bitrate string, d time.Duration) (UDPSummary, error) {
	args := []string{"iperf3", "-c", host, "-p", strconv.Itoa(benchIperf), "-u", "-l", strconv.Itoa(udpDatagram), "-b", bitrate,
		"-t", strconv.Itoa(int(d.Seconds())), "-J", "--connect-timeout", "5000"}
	for attempt := 1; ; attempt++ {
		out, err := client.ExecTimeout(d+30*time.Second, args...)
		s, err := parseIperfUDP(out, err)
		// The server takes a moment after one test before it accepts the next.
		if err == nil || attempt == 3 || !strings.Contains(err.Error(), "busy") {
			return s, err
		}
		time.Sleep(time.Second)
	}
}

// udp measures the UDP packet rate from client to host:5201 with iperf3 and records it as name,
// compared with refs.
func (b *bench) udp(t *testing.T, name string, client *Node, host string, refs ...string) {
	t.Run(name, func(t *testing.T) {
		cpu := b.cpuMeter()
		s, err := iperfUDP(client, host, "0", benchDuration)
		if err != nil {
			b.report.Fail(name, err)
			t.Fatalf("iperf3 -u to %s: %v", host, err)
		}
		rate := float64(s.ReceivedPackets) / s.Seconds
		m := &Measurement{Name: name, Value: rate, Unit: "pkt/s", Raw: s, CPU: cpu()}
		b.report.Add(m, refs...)
		t.Logf("%.0f datagrams/s received (%.0f Mbit/s of payload), %d sent, %.1f%% lost, client CPU %.0f%%, server CPU %.0f%%; daemons: %s",
			rate, rate*udpDatagram*8/1e6, s.SentPackets, s.LostPercent, s.HostCPU, s.RemoteCPU, formatCPU(m.CPU))
	})
}

// The paced search: trials of udpPacedTrial at an offered rate that doubles from udpPacedStart while
// the server loses at most udpPacedLoss percent, then udpPacedSteps bisections between the last rate
// carried and the first one not carried.
const (
	udpPacedStart = 2000 // datagrams per second
	udpPacedMax   = 512000
	udpPacedSteps = 3
	udpPacedLoss  = 1.0
	udpPacedTrial = 2 * time.Second
)

// udpTrial is one paced trial, in Raw.
type udpTrial struct {
	Offered     int     `json:"offeredPerSec"`
	Received    float64 `json:"receivedPerSec"`
	LostPercent float64 `json:"lostPercent"`
}

// udpPaced measures the highest rate at which client's datagrams reach host:5201 with at most
// udpPacedLoss percent lost, and records the rate received in that trial as name. Unlike the flood
// (udp), whose figure says how much of an overload each path still carries, this is the load a
// path carries cleanly: what a paced sender (a video stream, a game) can count on.
func (b *bench) udpPaced(t *testing.T, name string, client *Node, host string, refs ...string) {
	t.Run(name, func(t *testing.T) {
		var trials []udpTrial
		trial := func(rate int) (udpTrial, error) {
			s, err := iperfUDP(client, host, strconv.Itoa(rate*udpDatagram*8), udpPacedTrial)
			if err != nil {
				return udpTrial{}, fmt.Errorf("iperf3 -u -b at %d datagrams/s: %w", rate, err)
			}
			tr := udpTrial{Offered: rate, Received: float64(s.ReceivedPackets) / s.Seconds, LostPercent: s.LostPercent}
			trials = append(trials, tr)
			t.Logf("offered %d datagrams/s: received %.0f/s, %.2f%% lost", rate, tr.Received, tr.LostPercent)
			return tr, nil
		}
		cpu := b.cpuMeter()
		var best udpTrial
		good, bad := 0, 0
		var err error
		for rate := udpPacedStart; rate <= udpPacedMax && bad == 0; rate *= 2 {
			var tr udpTrial
			if tr, err = trial(rate); err != nil {
				break
			}
			if tr.LostPercent <= udpPacedLoss {
				good, best = rate, tr
			} else {
				bad = rate
			}
		}
		for i := 0; err == nil && bad > 0 && good > 0 && i < udpPacedSteps; i++ {
			mid := (good + bad) / 2
			var tr udpTrial
			if tr, err = trial(mid); err != nil {
				break
			}
			if tr.LostPercent <= udpPacedLoss {
				good, best = mid, tr
			} else {
				bad = mid
			}
		}
		if err == nil && good == 0 {
			err = fmt.Errorf("more than %.0f%% lost even at %d datagrams/s", udpPacedLoss, udpPacedStart)
		}
		if err != nil {
			b.report.Fail(name, err)
			t.Fatalf("paced UDP to %s: %v", host, err)
		}
		m := &Measurement{Name: name, Value: best.Received, Unit: "pkt/s", Raw: trials, CPU: cpu()}
		b.report.Add(m, refs...)
		t.Logf("%.0f datagrams/s carried with %.2f%% lost (offered %d/s); %d trials; daemons: %s",
			best.Received, best.LostPercent, best.Offered, len(trials), formatCPU(m.CPU))
	})
}
