package e2e

import (
	"encoding/json"
	"fmt"
	"strings"
)

// IperfSummary is the end of an iperf3 -J report: the raw numbers a TCP measurement keeps.
type IperfSummary struct {
	Streams int `json:"streams"`
	// SentBps and ReceivedBps are bits per second over the whole test, as the client and the
	// server counted them; ReceivedBps is the measurement.
	SentBps     float64 `json:"sentBps"`
	ReceivedBps float64 `json:"receivedBps"`
	Retransmits int     `json:"retransmits"`
	Seconds     float64 `json:"seconds"`
	// CPU use of the iperf3 client (host) and server (remote), percent of one CPU summed over
	// user and system.
	HostCPU   float64 `json:"hostCPU"`
	RemoteCPU float64 `json:"remoteCPU"`
}

// iperfCPU is the CPU use iperf3 -J reports: the client (host) and the server (remote), percent of
// one CPU.
type iperfCPU struct {
	Host   float64 `json:"host_total"`
	Remote float64 `json:"remote_total"`
}

// parseIperf reads the summary out of iperf3 -J output.
func parseIperf(out []byte) (IperfSummary, error) {
	var r struct {
		Error string `json:"error"`
		Start struct {
			Connected []json.RawMessage `json:"connected"`
		} `json:"start"`
		End struct {
			SumSent struct {
				Seconds     float64 `json:"seconds"`
				Bps         float64 `json:"bits_per_second"`
				Retransmits int     `json:"retransmits"`
			} `json:"sum_sent"`
			SumReceived struct {
				Bps float64 `json:"bits_per_second"`
			} `json:"sum_received"`
			CPU iperfCPU `json:"cpu_utilization_percent"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return IperfSummary{}, fmt.Errorf("iperf3 -J output: %w", err)
	}
	if r.Error != "" {
		return IperfSummary{}, fmt.Errorf("iperf3: %s", r.Error)
	}
	s := IperfSummary{
		Streams:     len(r.Start.Connected),
		SentBps:     r.End.SumSent.Bps,
		ReceivedBps: r.End.SumReceived.Bps,
		Retransmits: r.End.SumSent.Retransmits,
		Seconds:     r.End.SumSent.Seconds,
		HostCPU:     r.End.CPU.Host,
		RemoteCPU:   r.End.CPU.Remote,
	}
	if s.ReceivedBps <= 0 {
		return s, fmt.Errorf("iperf3: nothing received (the client sent at %.0f bit/s into its socket)", s.SentBps)
	}
	return s, nil
}

// parseIperfOutput reads the JSON object out of iperf3 -J's combined output, which may carry
// warnings around it; a JSON error beats the bare exit status.
func parseIperfOutput(out string, runErr error) (IperfSummary, error) {
	i := strings.Index(out, "{")
	if i < 0 {
		return IperfSummary{}, fmt.Errorf("%v: %s", runErr, strings.TrimSpace(out))
	}
	var raw json.RawMessage
	if err := json.NewDecoder(strings.NewReader(out[i:])).Decode(&raw); err != nil {
		return IperfSummary{}, fmt.Errorf("%v: iperf3 output: %v: %s", runErr, err, lastLines(out, 5))
	}
	s, err := parseIperf(raw)
	if err == nil && runErr != nil {
		err = runErr
	}
	return s, err
}
