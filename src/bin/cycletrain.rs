fn main() -> std::process::ExitCode {
    cycleserve::train::cli::main()
}
