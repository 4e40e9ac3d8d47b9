fn main() -> std::process::ExitCode {
    cycleserve::cli::main()
}
